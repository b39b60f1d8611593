import json
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from qmtl.common.cloudevents import encode, encode_text, is_cloudevent, make_event

T0 = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)


def test_required_attributes():
    ev = make_event("queue_update", {"queues": ["q1"]}, source="/gateway/gw-1", time=T0)
    assert ev == {
        "specversion": "1.0",
        "id": ev["id"],
        "source": "/gateway/gw-1",
        "type": "queue_update",
        "time": "2024-05-01T12:30:15.123456Z",
        "datacontenttype": "application/json",
        "data": {"queues": ["q1"]},
    }
    assert re.fullmatch(r"[0-9a-f]{32}", ev["id"])
    assert is_cloudevent(ev)


def test_default_ids_are_unique_and_explicit_id_kept():
    ids = {make_event("t", None, source="s")["id"] for _ in range(50)}
    assert len(ids) == 50
    assert make_event("t", None, source="s", id="evt-1")["id"] == "evt-1"


def test_time_is_utc_with_z():
    plus2 = timezone(timedelta(hours=2))
    assert make_event("t", 1, source="s", time=datetime(2024, 1, 1, 2, 0, tzinfo=plus2))["time"] == (
        "2024-01-01T00:00:00.000000Z"
    )
    assert make_event("t", 1, source="s", time=datetime(2024, 1, 1))["time"] == "2024-01-01T00:00:00.000000Z"  # noqa: DTZ001 - a naive time is read as UTC
    before = datetime.now(UTC)
    stamp = make_event("t", 1, source="s")["time"]
    assert stamp.endswith("Z")
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= parsed <= datetime.now(UTC)


def test_subject_and_extensions():
    ev = make_event("t", 1, source="s", subject="w1", extensions={"statehash": "abc", "seq": 7, "snapshot": True})
    assert ev["subject"] == "w1"
    assert (ev["statehash"], ev["seq"], ev["snapshot"]) == ("abc", 7, True)
    assert "subject" not in make_event("t", 1, source="s")


@pytest.mark.parametrize("name", ["State", "state_hash", "a" * 21, "", "x-y", "id", "type", "data", "time"])
def test_bad_extension_names_are_rejected(name):
    with pytest.raises(ValueError):
        make_event("t", 1, source="s", extensions={name: "v"})


def test_longest_extension_name_is_accepted():
    assert make_event("t", 1, source="s", extensions={"a" * 20: "v"})["a" * 20] == "v"


@pytest.mark.parametrize("value", [None, {"a": 1}, [1], 1.5])
def test_bad_extension_values_are_rejected(value):
    with pytest.raises(ValueError):
        make_event("t", 1, source="s", extensions={"ext": value})


@pytest.mark.parametrize("kwargs", [{"type": "", "source": "s"}, {"type": "t", "source": ""}, {"type": "t", "source": "s", "id": ""}])
def test_empty_required_attributes_are_rejected(kwargs):
    kind = kwargs.pop("type")
    with pytest.raises(ValueError):
        make_event(kind, 1, **kwargs)


def test_encode_is_compact_utf8_and_round_trips():
    ev = make_event("progress", {"msg": "ünïcode ✓", "n": [1, 2]}, source="s", id="x", time=T0)
    raw = encode(ev)
    assert isinstance(raw, bytes)
    assert b" " not in raw.replace("ünïcode ✓".encode(), b"")
    assert "ünïcode ✓".encode() in raw  # not \u-escaped
    assert raw.startswith(b'{"specversion":"1.0","id":"x",')
    assert json.loads(raw) == ev


def test_is_cloudevent():
    good = make_event("t", None, source="s")
    assert is_cloudevent(good)
    assert is_cloudevent(json.loads(encode(good)))
    assert not is_cloudevent({**good, "specversion": "0.3"})
    assert not is_cloudevent({k: v for k, v in good.items() if k != "source"})
    assert not is_cloudevent({**good, "id": ""})
    assert not is_cloudevent({**good, "type": 5})
    assert not is_cloudevent({"type": "queue_update", "data": {}})  # legacy frame
    assert not is_cloudevent("not a dict")
    assert not is_cloudevent(None)


def test_now_is_microseconds_with_z_and_moves_across_seconds(monkeypatch):
    import qmtl.common.cloudevents as ce

    stamps = iter([1714566615_123456_789, 1714566615_999999_999, 1714566616_000001_000])
    monkeypatch.setattr(ce._time, "time_ns", lambda: next(stamps))
    got = [make_event("t", 1, source="s")["time"] for _ in range(3)]
    assert got == ["2024-05-01T12:30:15.123456Z", "2024-05-01T12:30:15.999999Z", "2024-05-01T12:30:16.000001Z"]


def test_a_refused_extension_name_stays_refused_and_an_accepted_one_stays_accepted():
    for _ in range(3):
        with pytest.raises(ValueError):
            make_event("t", 1, source="s", extensions={"Bad-Name": "v"})
        assert make_event("t", 1, source="s", extensions={"goodname": "v"})["goodname"] == "v"
    with pytest.raises(ValueError):  # the value is still checked for a name seen before
        make_event("t", 1, source="s", extensions={"goodname": None})


def test_encode_text_is_encode_as_text():
    ev = make_event("progress", {"msg": "ünïcode ✓"}, source="s", id="x", time=T0)
    assert encode_text(ev) == encode(ev).decode()
