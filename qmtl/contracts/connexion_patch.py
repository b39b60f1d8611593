"""The one change to Connexion that no extension point allows, and the version check.

Connexion 3.3 validates every document it loads against its OpenAPI **3.0** meta-schema
(``Specification.__init__`` calls ``_validate_spec``; ``add_api`` and every middleware's
``with_base_path`` clone go through ``Specification.from_dict``, so there is no place to
hand it another ``Specification`` class). Our documents are OpenAPI 3.1 and are validated
up front by openapi-spec-validator (3.1-aware) in :mod:`qmtl.contracts.loader`, so
:func:`prepare` makes ``OpenAPISpecification._validate_spec`` skip documents declaring
``openapi: 3.1.x``; 3.0 documents keep Connexion's check. That is the whole patch.

Everything else Connexion is extended with goes through its extension points
(:mod:`qmtl.contracts.connexion_stack`, :mod:`qmtl.contracts.connexion31`), but those lean
on classes Connexion does not publish as an API, so :func:`prepare` first checks the
installed Connexion is one this code was written and tested for (:data:`SUPPORTED`) and
refuses to start otherwise, naming both. ``tests/unit/test_connexion_stack.py`` checks the
patched attribute and the hooks still exist and behave.

Drop the patch when Connexion supports OpenAPI 3.1 natively.
"""

from __future__ import annotations

import importlib.metadata
import typing as t

from qmtl.common.config import ConfigError

# Connexion releases this module and qmtl.contracts.connexion_stack were written for and
# tested with (major.minor; pyproject.toml pins the same range).
SUPPORTED: tuple[str, ...] = ("3.3",)


class ConnexionVersionError(ConfigError):
    """The installed Connexion is not one :data:`SUPPORTED` lists."""


def check_version(installed: str | None = None) -> str:
    """The installed Connexion version, after checking it is one of :data:`SUPPORTED`."""
    version = installed if installed is not None else importlib.metadata.version("connexion")
    if ".".join(version.split(".")[:2]) not in SUPPORTED:
        raise ConnexionVersionError(
            f"connexion {version} is installed; qmtl.contracts supports connexion {', '.join(f'{v}.x' for v in SUPPORTED)} "
            "(it extends Connexion's middleware, validator and operation classes and patches "
            "OpenAPISpecification._validate_spec): install a supported version (pip install 'connexion[uvicorn]>=3.3,<3.4') "
            "or port qmtl/contracts/connexion_patch.py and connexion_stack.py to the new one"
        )
    return version


_applied = False


def prepare() -> None:
    """Check the Connexion version and apply the 3.1 patch, once per process."""
    global _applied
    if _applied:
        return
    check_version()
    from connexion.spec import OpenAPISpecification

    original = OpenAPISpecification._validate_spec.__func__  # a classmethod (inherited from Specification)

    def _validate_spec(cls: type, spec: t.Mapping[str, t.Any]) -> None:
        if str(spec.get("openapi", "")).startswith("3.1"):
            return  # validated up front by qmtl.contracts.loader.validate_openapi
        original(cls, spec)

    OpenAPISpecification._validate_spec = classmethod(_validate_spec)
    _applied = True
