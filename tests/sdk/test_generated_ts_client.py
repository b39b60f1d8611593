"""A TypeScript client generated from the Gateway's served spec (``GET /openapi.json`` of a live
``qmtl up``) with openapi-typescript 7 and openapi-fetch, type-checked with TypeScript 5's
``tsc --strict`` and run with node against the same ``qmtl up``.

The npm tools are pinned in tools/package.json + package-lock.json and installed by
``make test`` (``npm ci`` in tools/). Any warning the generator prints fails the test, as does
a type error in tests/sdk/ts/client_usage.ts, which also holds ``@ts-expect-error`` lines
proving that what the spec forbids does not compile.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
NODE_MODULES = ROOT / "tools" / "node_modules"
USAGE = Path(__file__).with_name("ts") / "client_usage.ts"
TSCONFIG = {
    "compilerOptions": {
        "strict": True, "noUncheckedIndexedAccess": True, "noImplicitOverride": True,
        "target": "ES2022", "module": "NodeNext", "moduleResolution": "NodeNext",
        "outDir": "out", "skipLibCheck": False, "types": ["node"],
    },
    "files": ["gateway.ts", "client_usage.ts"],
}


def _node_tool(*parts: str) -> list[str]:
    path = NODE_MODULES.joinpath(*parts)
    assert path.exists(), f"{path} is missing: run `make tools` (npm ci in tools/; `make test` does it)"
    return [shutil.which("node") or "node", str(path)]


def _run(cmd: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "0"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


@pytest.fixture(scope="module")
def ts_project(live, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ts-client")
    r = httpx.get(live.url + "/openapi.json", timeout=10)
    assert r.status_code == 200, r.text
    (work / "gateway-openapi.json").write_bytes(r.content)
    (work / "node_modules").symlink_to(NODE_MODULES, target_is_directory=True)
    (work / "package.json").write_text(json.dumps({"type": "module", "private": True}))
    (work / "tsconfig.json").write_text(json.dumps(TSCONFIG))
    shutil.copy(USAGE, work / USAGE.name)
    gen = _run([*_node_tool("openapi-typescript", "bin", "cli.js"), "gateway-openapi.json", "-o", "gateway.ts",
                 # a property with a default is optional in a request body (the server fills it in)
                 "--default-non-nullable", "false"], work)
    log = gen.stdout + gen.stderr
    assert gen.returncode == 0, f"openapi-typescript failed on the served spec:\n{log}"
    noise = [line for line in log.splitlines() if re.search(r"warn|error|⚠|✘", line, re.IGNORECASE)]
    assert not noise, f"openapi-typescript warned:\n{log}"
    return work


def test_generated_types_cover_every_operation(ts_project):
    doc = json.loads((ts_project / "gateway-openapi.json").read_text())
    code = (ts_project / "gateway.ts").read_text()
    missing = [op["operationId"] for item in doc["paths"].values() for method, op in item.items()
               if method in ("get", "put", "post", "delete", "patch") and not re.search(rf"^\s*{op['operationId']}: {{", code, re.MULTILINE)]
    assert not missing, f"operations without types: {missing}"
    for name in doc["components"]["schemas"]:
        assert re.search(rf"^\s*{name}: ", code, re.MULTILINE), f"components/schemas/{name} has no type"


def test_ts_client_type_checks_strict_and_runs_against_qmtl_up(ts_project, live):
    tsc = _run([*_node_tool("typescript", "bin", "tsc"), "-p", "tsconfig.json"], ts_project)
    assert tsc.returncode == 0, f"tsc --strict failed:\n{tsc.stdout}{tsc.stderr}"
    version = _run([*_node_tool("typescript", "bin", "tsc"), "--version"], ts_project).stdout
    assert version.startswith("Version 5."), version
    run = _run([shutil.which("node") or "node", "out/client_usage.js", live.url], ts_project, timeout=60)
    assert run.returncode == 0, f"the TypeScript client failed against qmtl up:\n{run.stdout}{run.stderr}"
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["created"]["status"] == 201 and seen["created"]["world_id"].startswith("ts-")
    assert seen["conflict"] == {"status": 409, "problem_status": 409, "content_type": "application/problem+json"}
    assert seen["missing"] == {"status": 404, "problem_status": 404}
    assert seen["decide"]["status"] == 200 and seen["decide"]["mode"] in ("backtest", "dryrun", "live")
    assert seen["listed"] is True


def test_a_type_error_fails_the_check(ts_project):
    """The check is real: the same usage with a body the spec forbids does not compile."""
    broken = ts_project / "broken"
    broken.mkdir(exist_ok=True)
    for name in ("gateway.ts", "package.json"):
        shutil.copy(ts_project / name, broken / name)
    (broken / "node_modules").symlink_to(NODE_MODULES, target_is_directory=True)
    (broken / "tsconfig.json").write_text(json.dumps({**TSCONFIG, "compilerOptions": {**TSCONFIG["compilerOptions"], "noEmit": True}}))
    source = USAGE.read_text().replace('{ body: { world_id: worldId, name: "from TypeScript" } }',
                                       '{ body: { world_id: worldId, title: "from TypeScript" } }', 1)
    (broken / USAGE.name).write_text(source)
    tsc = _run([*_node_tool("typescript", "bin", "tsc"), "-p", "tsconfig.json"], broken)
    assert tsc.returncode != 0 and "title" in tsc.stdout, tsc.stdout + tsc.stderr
