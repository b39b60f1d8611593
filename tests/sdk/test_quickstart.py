"""``examples/quickstart.py`` — what a new user runs first — works against ``qmtl up``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_runs_against_qmtl_up_and_exits_0(live):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), live.url],
                          check=False, capture_output=True, text=True, timeout=90, cwd=ROOT)
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{proc.stderr}"
    assert "snapshot      activation" in out and "progress" in out
    assert "TagQueryNode" in out and "now reads ['" in out  # the TagQueryNode was resolved to a queue
    assert "active=True weight=0.5" in out  # the activation arrived as an event
    assert "long: allowed (weight 0.5); short: gated off" in out
    assert out.rstrip().endswith("done.")
