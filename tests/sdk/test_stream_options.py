"""StreamOptions: defaults, bounds, and the deprecated tuning keywords of EventStream
(accepted, mapped onto the options, a DeprecationWarning naming ``options=``)."""

from __future__ import annotations

import dataclasses
import inspect
import random
import warnings

import pytest

from qmtl.sdk import EventStream, GatewayClient, StreamOptions
from qmtl.sdk.stream.options import LEGACY_KEYWORDS

# the defaults EventStream had as keyword arguments before StreamOptions
OLD_DEFAULTS = {
    "reconnect_base": 0.1, "reconnect_max": 5.0, "fallback_after": 2, "refresh_at": 0.75, "reconcile_after": 3.0,
    "reconcile_interval": 2.0, "open_timeout": 5.0, "idle_timeout": 45.0, "primary_retry_interval": 30.0,
    "max_buffer": 10_000, "rng": None,
}


def test_defaults_are_the_old_keyword_defaults():
    o = StreamOptions()
    assert {k: getattr(o, k) for k in OLD_DEFAULTS} == OLD_DEFAULTS
    assert o.refusal_grace == 0.3
    assert set(OLD_DEFAULTS) == LEGACY_KEYWORDS


def test_frozen_and_replace_validates_again():
    o = StreamOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.reconnect_max = 1.0  # type: ignore[misc]
    assert o.replace(reconnect_max=0.5).reconnect_max == 0.5 and o.reconnect_max == 5.0
    assert o.replace(refresh_at=5).refresh_at == 0.95


@pytest.mark.parametrize(("given", "field", "expected"), [
    ({"fallback_after": 0}, "fallback_after", 1),
    ({"fallback_after": 3.7}, "fallback_after", 3),
    ({"refresh_at": 0.01}, "refresh_at", 0.1),
    ({"refresh_at": 1.5}, "refresh_at", 0.95),
    ({"refresh_at": 0.5}, "refresh_at", 0.5),
    ({"max_buffer": 0}, "max_buffer", 1),
])
def test_clamped_as_before(given, field, expected):
    assert getattr(StreamOptions(**given), field) == expected


@pytest.mark.parametrize("given", [{"reconnect_max": -1}, {"idle_timeout": "5"}, {"reconcile_interval": True}])
def test_nonsense_is_refused(given):
    with pytest.raises(ValueError, match=next(iter(given))):
        StreamOptions(**given)


def test_the_constructor_takes_subscription_and_options_only():
    params = inspect.signature(EventStream).parameters
    assert "options" in params and not (set(params) & LEGACY_KEYWORDS)


async def test_legacy_keywords_warn_and_map_onto_the_options():
    rng = random.Random(7)
    async with GatewayClient("http://127.0.0.1:1") as client:
        with pytest.warns(DeprecationWarning, match=r"options=StreamOptions\(fallback_after=\.\.\., reconnect_max=\.\.\., rng=\.\.\.\)") as rec:
            old = EventStream(client, world_id="w", reconnect_max=0.5, fallback_after=0, rng=rng)
        assert rec[0].filename == __file__  # points at the caller
        new = EventStream(client, world_id="w", options=StreamOptions(reconnect_max=0.5, fallback_after=0, rng=rng))
        assert old.options == new.options == StreamOptions(reconnect_max=0.5, fallback_after=1)
        assert old.options.rng is rng and old.session.options is old.options
        # on top of given options
        with pytest.warns(DeprecationWarning):
            both = EventStream(client, world_id="w", options=StreamOptions(idle_timeout=9), refresh_at=0.5)
        assert (both.options.idle_timeout, both.options.refresh_at) == (9, 0.5)
        # no keywords: no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            EventStream(client, world_id="w")
        with pytest.raises(TypeError, match="reconect_max"):
            EventStream(client, world_id="w", reconect_max=1)


async def test_legacy_keywords_behave_the_same():
    """The same seeded jitter and clamping from keywords as from options."""
    async with GatewayClient("http://127.0.0.1:1") as client:
        with pytest.warns(DeprecationWarning):
            old = EventStream(client, world_id="w", reconnect_base=0.2, reconnect_max=1.0, rng=random.Random(1))
        new = EventStream(client, world_id="w",
                          options=StreamOptions(reconnect_base=0.2, reconnect_max=1.0, rng=random.Random(1)))
        assert [old.session.backoff(n) for n in range(1, 8)] == [new.session.backoff(n) for n in range(1, 8)]
        assert old.health.idle_timeout == new.health.idle_timeout == 45.0
