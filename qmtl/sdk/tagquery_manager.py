"""The Aug-2025 import path: ``from qmtl.sdk.tagquery_manager import TagQueryManager``.

The same class as :class:`qmtl.sdk.TagQueryManager` (one implementation, in
:mod:`qmtl.sdk.tagquery`), which also takes that era's constructor
(``TagQueryManager(gateway_url=None, *, ws_client=None, world_id=None, strategy_id=None)``)
and methods (``register``, ``unregister``, ``resolve_tags``, ``handle_message``, ``start``,
``stop``).
"""

from .tagquery import TagQueryManager
from .ws_client import WebSocketClient

__all__ = ["TagQueryManager", "WebSocketClient"]
