"""Only what pyproject.toml cannot say: the wheel carries ``specs/`` (the source of truth, kept
at the repository root) as package data under ``qmtl/_specs``, where
:func:`qmtl.contracts.loader.find_specs_dir` finds it once installed. Editable installs read
``specs/`` of the checkout directly, so nothing is copied for them."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class build_py_with_specs(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "qmtl" / "_specs"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(ROOT / "specs", target, ignore=shutil.ignore_patterns("*~", ".*"))


setup(cmdclass={"build_py": build_py_with_specs})
