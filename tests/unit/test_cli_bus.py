"""The ``controlbus`` config section reaches the bus ``qmtl up`` builds."""

from __future__ import annotations

from qmtl.bus import InProcessBus, make_bus
from qmtl.bus.kafka import KafkaBus
from qmtl.cli import bus_options
from qmtl.common.config import load_config


def test_kafka_section_from_the_environment_reaches_the_kafka_bus():
    cfg = load_config(environ={
        "QMTL__CONTROLBUS__KIND": "kafka",
        "QMTL__CONTROLBUS__BOOTSTRAP_SERVERS": "k1:9092,k2:9092",
        "QMTL__CONTROLBUS__NUM_PARTITIONS": "8",
        "QMTL__CONTROLBUS__FETCH_MAX_WAIT_MS": "25",
    })
    bus = make_bus(bus_options(cfg), validator=None)
    assert isinstance(bus, KafkaBus)
    assert bus.bootstrap_servers == "k1:9092,k2:9092"
    assert bus._num_partitions == 8
    assert bus._fetch_max_wait_ms == 25


def test_embedded_default_is_the_in_process_bus():
    bus = make_bus(bus_options(load_config(environ={})), validator=None)
    assert isinstance(bus, InProcessBus)
