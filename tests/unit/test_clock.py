from qmtl.common.clock import SYSTEM_CLOCK, Clock, ManualClock


def test_manual_clock_moves_only_when_told():
    clock: Clock = ManualClock(start=100.0)
    assert clock.time() == 100.0
    m = clock.monotonic()
    clock.advance(30)  # type: ignore[attr-defined]
    assert clock.time() == 130.0 and clock.monotonic() == m + 30
    assert ManualClock(start=0).now().year == 1970


def test_manual_clock_refuses_to_go_back():
    import pytest

    with pytest.raises(ValueError):
        ManualClock().advance(-1)


def test_system_clock_reads_real_time():
    import time

    assert abs(SYSTEM_CLOCK.time() - time.time()) < 5
    a = SYSTEM_CLOCK.monotonic()
    assert SYSTEM_CLOCK.monotonic() >= a
