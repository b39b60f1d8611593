"""``python -m tests.helpers.ws_hooked worldservice --port ...``: the real ``qmtl`` CLI in
a process whose WorldService pauses its applies at one phase (the service's
``applies.hook``), for multi-process tests that kill a replica in the middle of an apply.

While the file named by ``WSHOOK_PAUSE_FILE`` exists, an apply reaching the phase
``WSHOOK_PAUSE_AT`` (``frozen``, ``drained`` or ``switched``) writes its run_id to
``<file>.reached`` and waits until the file is removed (or the process is killed).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from qmtl.worldservice.service import WorldService

PAUSE_AT = os.environ.get("WSHOOK_PAUSE_AT", "switched")
PAUSE_FILE = Path(os.environ["WSHOOK_PAUSE_FILE"])

_init = WorldService.__init__


async def _hook(phase: str, world_id: str, run_id: str) -> None:
    if phase != PAUSE_AT or not PAUSE_FILE.exists():
        return
    PAUSE_FILE.with_name(PAUSE_FILE.name + ".reached").write_text(run_id)
    while PAUSE_FILE.exists():
        await asyncio.sleep(0.02)


def _init_with_hook(self: WorldService, *args, **kwargs) -> None:
    _init(self, *args, **kwargs)
    self.applies.hook = _hook


WorldService.__init__ = _init_with_hook  # type: ignore[method-assign]

if __name__ == "__main__":
    from qmtl.cli import main

    sys.exit(main(sys.argv[1:]))
