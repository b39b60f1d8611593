from qmtl.store.kv import kv_ping, make_kv
from qmtl.store.sql import Database, drop_schema, normalise_url, sqlite_url

__all__ = ["Database", "drop_schema", "normalise_url", "sqlite_url", "make_kv", "kv_ping"]
