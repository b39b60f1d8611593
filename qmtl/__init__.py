"""QMTL control plane.

``__version__`` is the one version of the project: the package's (pyproject.toml reads it),
``qmtl --version``'s, and the ``info.version`` every spec in ``specs/`` declares (a test
checks they agree: tests/e2e/test_wheel.py).
"""

__version__ = "1.0.0"
