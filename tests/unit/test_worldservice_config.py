"""WorldService configuration is checked when the service is built."""

from __future__ import annotations

import pytest

from qmtl.bus.inproc import InProcessBus
from qmtl.common.config import Config, ConfigError, load_config
from qmtl.store.sql import Database, sqlite_url
from qmtl.worldservice.app import create_app, create_service


def test_enforce_without_a_service_token_is_refused(tmp_path):
    cfg = load_config(environ={"QMTL__WORLDSERVICE__RBAC": "enforce"})
    with pytest.raises(ConfigError, match="service_token is empty"):
        create_service(cfg, bus=InProcessBus(), db=Database(sqlite_url(tmp_path / "x.db")))


def test_a_bad_decision_ttl_is_refused(tmp_path):
    cfg = Config()
    cfg.worldservice.decision_ttl = "five minutes"
    with pytest.raises(ConfigError, match="decision_ttl"):
        create_app(cfg, bus=InProcessBus(), db=Database(sqlite_url(tmp_path / "x.db")))


def test_defaults_build_a_dev_mode_service_with_its_own_metrics(tmp_path):
    cfg = Config()
    a = create_service(cfg, bus=InProcessBus(), db=Database(sqlite_url(tmp_path / "a.db")))
    b = create_service(cfg, bus=InProcessBus(), db=Database(sqlite_url(tmp_path / "b.db")))
    assert a.auth.mode == "dev" and a.decisions.ttl_seconds == 300
    assert a.metrics.registry is not b.metrics.registry  # no global registry: services can share a process
