#!/usr/bin/env python3
"""Copy the documentation UIs the services serve offline from the pinned npm packages in
``tools/`` (``npm ci`` there first) into ``qmtl/contracts/docs_assets/`` (package data, in
the wheel), and record where each file came from in ``manifest.json``.

    python scripts/vendor_docs_assets.py           # (re)generate after changing tools/package.json
    python scripts/vendor_docs_assets.py --check   # exit 1 when the copies differ from tools/node_modules

Why vendored files and not an install-time step: the services must serve /docs and
/asyncapi from a plain ``pip install`` on a machine without Node.js or network, so the files
travel inside the wheel; the npm packages (swagger-ui-dist, @asyncapi/react-component) stay
the maintained source, pinned by tools/package-lock.json, and the suite fails when the
copies drift from them (tests/unit/test_docs_assets.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NODE_MODULES = ROOT / "tools" / "node_modules"
ASSETS = ROOT / "qmtl" / "contracts" / "docs_assets"

# served name -> (npm package, file inside the package)
FILES = {
    "swagger-ui-bundle.js": ("swagger-ui-dist", "swagger-ui-bundle.js"),
    "swagger-ui.css": ("swagger-ui-dist", "swagger-ui.css"),
    "swagger-ui.LICENSE": ("swagger-ui-dist", "LICENSE"),
    "favicon-32x32.png": ("swagger-ui-dist", "favicon-32x32.png"),
    "asyncapi-standalone.js": ("@asyncapi/react-component", "browser/standalone/index.js"),
    "asyncapi.css": ("@asyncapi/react-component", "styles/default.min.css"),
    "asyncapi.LICENSE": ("@asyncapi/react-component", "LICENSE"),
}


def _sources() -> dict[str, tuple[Path, str, str]]:
    out = {}
    for name, (package, rel) in FILES.items():
        pkg_dir = NODE_MODULES / package
        try:
            version = json.loads((pkg_dir / "package.json").read_text())["version"]
        except OSError:
            raise SystemExit(f"{pkg_dir}: not installed; run `npm ci --ignore-scripts` in tools/ (make tools)") from None
        out[name] = (pkg_dir / rel, package, version)
    return out


def manifest(sources: dict[str, tuple[Path, str, str]]) -> dict:
    return {
        "generated_by": "scripts/vendor_docs_assets.py",
        "files": {
            name: {"package": package, "version": version, "path": FILES[name][1],
                   "sha256": hashlib.sha256(src.read_bytes()).hexdigest()}
            for name, (src, package, version) in sorted(sources.items())
        },
    }


def check() -> list[str]:
    """What differs between the vendored copies and the pinned packages (empty when none)."""
    sources = _sources()
    problems = []
    for name, (src, package, version) in sources.items():
        dest = ASSETS / name
        if not dest.is_file():
            problems.append(f"{dest.relative_to(ROOT)} is missing")
        elif dest.read_bytes() != src.read_bytes():
            problems.append(f"{dest.relative_to(ROOT)} differs from {package}@{version}/{FILES[name][1]}")
    try:
        recorded = json.loads((ASSETS / "manifest.json").read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded != manifest(sources):
        problems.append(f"{(ASSETS / 'manifest.json').relative_to(ROOT)} does not match tools/node_modules")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print("run: python scripts/vendor_docs_assets.py", file=sys.stderr)
        return 1 if problems else 0
    sources = _sources()
    ASSETS.mkdir(parents=True, exist_ok=True)
    for name, (src, _package, _version) in sources.items():
        (ASSETS / name).write_bytes(src.read_bytes())
    (ASSETS / "manifest.json").write_text(json.dumps(manifest(sources), indent=2) + "\n")
    print(f"vendored {len(sources)} files into {ASSETS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
