"""librdkafka's mock Kafka cluster for tests, and a small event validator.

Load it as a pytest plugin (``pytest_plugins = ["tests.kafka_mock"]``) to get:

* ``kafka_cluster`` (module scope): a running :class:`MockKafkaCluster`;
* ``kafka_bootstrap`` (module scope): its ``bootstrap.servers`` string;
* ``fresh_kafka_cluster`` (function scope): a cluster of its own, for broker controls;
* ``event_validator``: a jsonschema validator of the control events by topic.

The mock cluster is the one librdkafka ships (inside the ``confluent-kafka`` wheel). It
speaks the Kafka protocol on localhost, so aiokafka talks to it like to a broker.
Two ways to start it, tried in order:

1. **librdkafka's mock C API through ctypes** (``rd_kafka_mock_cluster_new`` and
   friends, exported by the librdkafka that confluent-kafka loads). This one also
   gives controls the Python binding does not expose: take a broker down and up
   (``rd_kafka_mock_broker_set_down/up``: the listener closes and refuses
   connections; data is kept), create a topic with N partitions
   (``rd_kafka_mock_topic_create``, the mock has no CreateTopics), and inject
   error responses (``rd_kafka_mock_push_request_errors_array``).
2. **``confluent_kafka.Producer({"test.mock.num.brokers": N, ...})``**: the client
   builds a mock cluster for itself and logs ``Mock cluster ... bootstrap.servers=...``;
   the address is parsed from that log line. It must stay alive, so a thread polls
   it. No broker controls in this mode.

When neither works the fixtures *fail* (never skip): these tests must be loud in CI.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

__all__ = [
    "MockKafkaCluster",
    "MockClusterError",
    "start_mock_cluster",
    "schema_validator",
    "kafka_cluster",
    "kafka_bootstrap",
    "fresh_kafka_cluster",
    "event_validator",
]

log = logging.getLogger("tests.kafka_mock")

_BOOTSTRAP_RE = re.compile(r"bootstrap\.servers=(\S+)")


class MockClusterError(RuntimeError):
    pass


def _librdkafka() -> ctypes.CDLL:
    """The librdkafka that confluent_kafka itself loaded (same process, same copy)."""
    import confluent_kafka  # loads librdkafka

    path = None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                if "librdkafka" in line:
                    path = line.split()[-1]
                    break
    except OSError:
        pass
    if path is None:
        libs = Path(confluent_kafka.__file__).resolve().parent.parent / "confluent_kafka.libs"
        found = sorted(libs.glob("librdkafka*.so*"))
        if found:
            path = str(found[0])
    if path is None:
        path = ctypes.util.find_library("rdkafka")
    if path is None:
        raise MockClusterError("cannot locate the librdkafka shared library")
    lib = ctypes.CDLL(path)
    vp, cp, i32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32
    sigs = {
        "rd_kafka_conf_new": ([], vp),
        "rd_kafka_conf_set": ([vp, cp, cp, cp, ctypes.c_size_t], ctypes.c_int),
        "rd_kafka_new": ([ctypes.c_int, vp, cp, ctypes.c_size_t], vp),
        "rd_kafka_destroy": ([vp], None),
        "rd_kafka_mock_cluster_new": ([vp, ctypes.c_int], vp),
        "rd_kafka_mock_cluster_destroy": ([vp], None),
        "rd_kafka_mock_cluster_bootstraps": ([vp], cp),
        "rd_kafka_mock_broker_set_down": ([vp, i32], ctypes.c_int),
        "rd_kafka_mock_broker_set_up": ([vp, i32], ctypes.c_int),
        "rd_kafka_mock_topic_create": ([vp, cp, ctypes.c_int, ctypes.c_int], ctypes.c_int),
        "rd_kafka_mock_push_request_errors_array": (
            [vp, ctypes.c_int16, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int)], None
        ),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)  # AttributeError when the symbol is not exported
        fn.argtypes = args
        fn.restype = res
    return lib


class MockKafkaCluster:
    """A librdkafka mock Kafka cluster on 127.0.0.1 (see the module docstring)."""

    def __init__(self, num_brokers: int = 1) -> None:
        self.num_brokers = num_brokers
        self.bootstrap_servers: str = ""
        self.mode: str = ""
        self._lib: ctypes.CDLL | None = None
        self._rk = None
        self._mcluster = None
        self._producer = None
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()
        self._log_handler: _Capture | None = None

    # -- start / stop -----------------------------------------------------------
    def start(self) -> MockKafkaCluster:
        errors = []
        for mode, starter in (("ctypes", self._start_ctypes), ("producer", self._start_producer)):
            try:
                starter()
                self.mode = mode
                log.info("mock Kafka cluster (%s) at %s", mode, self.bootstrap_servers)
                return self
            except Exception as exc:  # try the next way
                errors.append(f"{mode}: {type(exc).__name__}: {exc}")
                self.stop()
        raise MockClusterError("librdkafka mock cluster did not start: " + "; ".join(errors))

    def _start_ctypes(self) -> None:
        lib = _librdkafka()
        errstr = ctypes.create_string_buffer(512)
        conf = lib.rd_kafka_conf_new()
        # Quiet: this handle only hosts the cluster (no bootstrap.servers warning).
        lib.rd_kafka_conf_set(conf, b"log_level", b"3", errstr, len(errstr))
        rk = lib.rd_kafka_new(0, conf, errstr, len(errstr))  # 0 = RD_KAFKA_PRODUCER
        if not rk:
            raise MockClusterError(f"rd_kafka_new failed: {errstr.value.decode(errors='replace')}")
        self._lib, self._rk = lib, rk
        mcluster = lib.rd_kafka_mock_cluster_new(rk, self.num_brokers)
        if not mcluster:
            raise MockClusterError("rd_kafka_mock_cluster_new returned NULL")
        self._mcluster = mcluster
        self.bootstrap_servers = lib.rd_kafka_mock_cluster_bootstraps(mcluster).decode()

    def _start_producer(self) -> None:
        import confluent_kafka

        self._stop = threading.Event()
        capture = self._log_handler = _Capture()
        logger = logging.getLogger(f"tests.kafka_mock.rdkafka.{id(self)}")
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        logger.addHandler(capture)
        self._producer = confluent_kafka.Producer(
            {"test.mock.num.brokers": self.num_brokers, "logger": logger, "debug": "mock"}
        )
        # librdkafka logs "Mock cluster <name> bootstrap.servers=<addr>" at creation;
        # the metadata of the client's own cluster is the fallback.
        self._producer.poll(0.1)
        for text in capture.texts():
            match = _BOOTSTRAP_RE.search(text)
            if match:
                self.bootstrap_servers = match.group(1)
                break
        else:
            md = self._producer.list_topics(timeout=5)
            self.bootstrap_servers = ",".join(f"{b.host}:{b.port}" for b in md.brokers.values())
        if not self.bootstrap_servers:
            raise MockClusterError("no bootstrap.servers from the mock cluster")
        # Keep the client (and so its cluster) serviced while tests run.
        self._poller = threading.Thread(target=self._poll, name="kafka-mock-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.2)
            if self._log_handler is not None:
                self._log_handler.trim()

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
            self._poller = None
        if self._producer is not None:
            self._producer = None  # destroying the client destroys its cluster
        if self._mcluster is not None:
            self._lib.rd_kafka_mock_cluster_destroy(self._mcluster)
            self._mcluster = None
        if self._rk is not None:
            self._lib.rd_kafka_destroy(self._rk)
            self._rk = None

    def __enter__(self) -> MockKafkaCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- controls (ctypes mode only) --------------------------------------------
    def _need_controls(self, what: str) -> None:
        if self._mcluster is None:
            raise MockClusterError(
                f"{what} needs librdkafka's mock C API (ctypes mode); this cluster runs in {self.mode!r} mode"
            )

    def broker_down(self, broker_id: int | None = None) -> None:
        """Close the broker's connections and refuse new ones (all brokers by default)."""
        self._need_controls("broker_down")
        for b in self._brokers(broker_id):
            self._check(self._lib.rd_kafka_mock_broker_set_down(self._mcluster, b), "broker_set_down")

    def broker_up(self, broker_id: int | None = None) -> None:
        self._need_controls("broker_up")
        for b in self._brokers(broker_id):
            self._check(self._lib.rd_kafka_mock_broker_set_up(self._mcluster, b), "broker_set_up")

    def create_topic(self, name: str, partitions: int, replication_factor: int = 1) -> None:
        """Create a topic directly in the mock (it does not implement CreateTopics)."""
        self._need_controls("create_topic")
        err = self._lib.rd_kafka_mock_topic_create(self._mcluster, name.encode(), partitions, replication_factor)
        self._check(err, "topic_create")

    def push_request_errors(self, api_key: int, *errors: int) -> None:
        """Answer the next ``len(errors)`` requests of ``api_key`` with these error codes.

        E.g. ``push_request_errors(1, 29, 29)``: the next two Fetch requests fail
        with TOPIC_AUTHORIZATION_FAILED.
        """
        self._need_controls("push_request_errors")
        array = (ctypes.c_int * len(errors))(*errors)
        self._lib.rd_kafka_mock_push_request_errors_array(self._mcluster, api_key, len(errors), array)

    def _brokers(self, broker_id: int | None) -> list[int]:
        return list(range(1, self.num_brokers + 1)) if broker_id is None else [broker_id]

    @staticmethod
    def _check(err: int, what: str) -> None:
        if err != 0:
            raise MockClusterError(f"rd_kafka_mock_{what} failed with error code {err}")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._texts: list[str] = []
        self._lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_:
            self._texts.append(record.getMessage())

    def texts(self) -> list[str]:
        with self._lock_:
            return list(self._texts)

    def trim(self) -> None:
        with self._lock_:
            del self._texts[:-100]


def start_mock_cluster(num_brokers: int = 1) -> MockKafkaCluster:
    """Start a mock cluster or fail the test (never skip) with the reason."""
    try:
        import confluent_kafka  # noqa: F401
    except ImportError as exc:
        pytest.fail(
            f"confluent-kafka is required for the Kafka tests (librdkafka's mock cluster): {exc}. "
            "Install the dev extras: pip install -e '.[dev]'",
            pytrace=False,
        )
    try:
        return MockKafkaCluster(num_brokers).start()
    except Exception as exc:
        pytest.fail(f"librdkafka's mock Kafka cluster could not be started: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def kafka_cluster():
    cluster = start_mock_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def kafka_bootstrap(kafka_cluster: MockKafkaCluster) -> str:
    return kafka_cluster.bootstrap_servers


@pytest.fixture
def fresh_kafka_cluster():
    """A cluster of its own for one test (for tests that take brokers down)."""
    cluster = start_mock_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


# -- a small validator for tests ---------------------------------------------------
# The real validator (built from specs/asyncapi.yaml by qmtl.contracts) is wired by
# the integrator; this one maps each control topic to its event schema.

SCHEMAS_DIR = Path(__file__).resolve().parents[1] / "specs" / "schemas"
TOPIC_SCHEMAS = {
    "control.activation": "event_activation_updated.schema.json",
    "control.policy": "event_policy_updated.schema.json",
    "control.queues": "event_queue_updated.schema.json",
}


def schema_validator(schemas_dir: Path = SCHEMAS_DIR) -> Callable[[str, Mapping], None]:
    from jsonschema import Draft202012Validator

    from qmtl.bus import InvalidEvent

    validators = {
        topic: Draft202012Validator(json.loads((schemas_dir / name).read_text(encoding="utf-8")))
        for topic, name in TOPIC_SCHEMAS.items()
    }

    def validate(topic: str, event: Mapping) -> None:
        validator = validators.get(topic)
        if validator is None:
            raise InvalidEvent(f"no schema for topic {topic!r}")
        error = next(validator.iter_errors(event), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            raise InvalidEvent(f"{topic}: {where}: {error.message}")

    return validate


@pytest.fixture(scope="session")
def event_validator() -> Callable[[str, Mapping], None]:
    return schema_validator()
