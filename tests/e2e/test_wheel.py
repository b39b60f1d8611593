"""The project installs as a package: a wheel built from the sources carries ``specs/`` (as
``qmtl/_specs``) and the docs UIs; installed into a fresh venv outside the checkout,
``qmtl --version``, ``qmtl check-specs`` and ``qmtl up`` work from there.

The wheel is built by pip (with build isolation, as a user builds it) from a copy of the
sources, so no build directory is left in the checkout. The fresh venv has no pip and no
dependencies of its own: a ``.pth`` file puts this venv's site-packages after its own (so
the dependencies come from here without a download), and the wheel goes in with
``--no-deps``. The checkout's editable install is not visible there (``.pth`` files of an
added directory are not processed), and the test checks that ``qmtl`` runs from the wheel.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import httpx
import pytest
import yaml

import qmtl
from qmtl.contracts.loader import ASYNCAPI_FILE, OPENAPI_FILES, SPECS_DIR
from tests.helpers.server import free_port, wait_all_healthy

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "qmtl", "handlers", "specs"]


def test_one_version_everywhere():
    """qmtl.__version__ is the package's version, `qmtl --version`'s and every spec's info.version."""
    for name in [*OPENAPI_FILES.values(), ASYNCAPI_FILE]:
        info = yaml.safe_load((SPECS_DIR / name).read_text())["info"]
        assert info["version"] == qmtl.__version__, f"specs/{name} info.version {info['version']} != {qmtl.__version__}"
    out = subprocess.run([str(Path(sys.executable).with_name("qmtl")), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"qmtl {qmtl.__version__}"


def _run(cmd: list[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "node_modules")
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, src / name, **({"ignore": ignore} if (ROOT / name).is_dir() else {}))
    dist = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dist), str(src)], base)
    wheels = list(dist.glob("qmtl_control_plane-*.whl"))
    assert len(wheels) == 1 and wheels[0].name.startswith(f"qmtl_control_plane-{qmtl.__version__}-"), wheels

    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], base)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base).strip())
    (site / "outer-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheels[0])], base)
    return venv


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("QMTL", "PYTHON"))} | {"PYTHONUNBUFFERED": "1"}


def test_wheel_carries_specs_and_docs_and_runs_from_the_fresh_venv(installed, tmp_path):
    py, qmtl_bin = installed / "bin" / "python", installed / "bin" / "qmtl"
    where = _run([str(py), "-c", ("import qmtl, qmtl.contracts.loader as l, qmtl.contracts.docs as d; "
                                  "print(qmtl.__file__); print(l.SPECS_DIR); print(d.ASSETS_DIR)")], tmp_path, env=_env()).split()
    assert all(p.startswith(str(installed)) for p in where), f"not running from the wheel: {where}"
    assert where[1].endswith("qmtl/_specs")
    assert _run([str(qmtl_bin), "--version"], tmp_path, env=_env()).strip() == f"qmtl {qmtl.__version__}"
    assert "all specs valid" in _run([str(qmtl_bin), "check-specs"], tmp_path, env=_env())

    ports = [free_port(), free_port(), free_port()]
    proc = subprocess.Popen(
        [str(qmtl_bin), "up", "--data-dir", str(tmp_path / "data"), "--gateway-port", str(ports[0]),
         "--worldservice-port", str(ports[1]), "--dagmanager-port", str(ports[2])],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        wait_all_healthy(urls, proc, timeout=90)
        for url in urls:
            assert httpx.get(url + "/health", timeout=5).json()["status"] == "ok"
            assert httpx.get(url + "/openapi.json", timeout=5).json()["info"]["version"] == qmtl.__version__
            assert httpx.get(url + "/docs/static/swagger-ui-bundle.js", timeout=5).status_code == 200
            assert httpx.get(url + "/asyncapi.yaml", timeout=5).status_code == 200
        assert httpx.get(urls[0] + "/worlds", timeout=10).status_code == 200  # Gateway → WorldService
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
