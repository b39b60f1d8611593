"""One config object, read once at start.

One YAML file with a section per service (``gateway``, ``worldservice``,
``dagmanager``) plus shared ``controlbus`` and ``data_dir``. Environment variables
override the file: ``QMTL__<SECTION>__<KEY>=value`` (nested keys joined with ``__``,
values parsed as YAML scalars, e.g. ``QMTL__GATEWAY__ALLOW_LIVE=true``), and
``QMTL_CONFIG`` names the file. No file selects the embedded defaults: in-process
bus, SQLite files under ``data_dir``, the in-memory Redis substitute, development
auth — each stated in the printed config so nothing is silently permissive.
"""

from __future__ import annotations

import copy
import os
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "QMTL__"


class ConfigError(ValueError):
    pass


@dataclass
class BusConfig:
    kind: str = "inproc"  # inproc | kafka
    bootstrap_servers: str = ""
    num_partitions: int = 4
    create_topics: bool = True
    # Kafka: how long a consumer's fetch waits at the broker for data (aiokafka's default).
    fetch_max_wait_ms: int = 500


@dataclass
class TracingConfig:
    """OpenTelemetry tracing (qmtl.common.tracing): off by default, no cost when off."""

    enabled: bool = False
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"  # OTLP/HTTP (protobuf)
    sample_ratio: float = 1.0  # parent-based: a sampled caller is always followed
    service_name_prefix: str = "qmtl-"


@dataclass
class BudgetConfig:
    timeout: float = 0.3
    retries: int = 2


@dataclass
class BreakerConfig:
    failure_threshold: int = 5
    reset_timeout: float = 10.0
    # WorldService: one breaker per operation (method + route of its spec), so failures of one
    # operation (one caller's flood of it, say) do not refuse the others; false: one breaker.
    per_operation: bool = True


@dataclass
class LimitsConfig:
    """Bounds of one service's HTTP server (each service section has its own ``limits``)."""
    # request bodies (413 / 400 / 408 problem+json)
    max_body_bytes: int = 1_048_576  # operations without ``x-qmtl-max-body-bytes`` in the spec
    max_json_depth: int = 64  # nesting of arrays/objects in a JSON body
    body_timeout: float = 30.0  # the whole body must arrive within this many seconds (408)
    # connections (the HTTP server)
    header_timeout: float = 10.0  # request line + headers must arrive within this after connect or the previous response
    keep_alive_timeout: float = 5.0  # idle keep-alive connections are closed after this
    max_header_bytes: int = 65_536  # request line + headers (431)
    max_connections: int = 2_048  # open connections; above it only /health, /ready, /metrics are served (503 otherwise)
    health_headroom: int = 64  # connections beyond max_connections kept for health probes; more are closed at once
    backlog: int = 2_048


@dataclass
class RateClassConfig:
    rate: float = 50.0  # tokens per second
    burst: int = 100  # bucket size


@dataclass
class RateLimitConfig:
    # "auto": enforced when gateway.auth.mode is "jwt", disabled in development mode (announced at
    # startup); "enforce" / "disabled" force it. (Not on/off: YAML reads those as booleans.)
    mode: str = "auto"
    # token buckets per subject (per client address when anonymous), by class; an operation's
    # class is its ``x-qmtl-rate-class`` in the spec, else "read" for GET/HEAD, "write" otherwise
    read: RateClassConfig = field(default_factory=lambda: RateClassConfig(50.0, 100))
    write: RateClassConfig = field(default_factory=lambda: RateClassConfig(10.0, 30))
    max_buckets: int = 100_000  # in-memory buckets kept (LRU), per process


@dataclass
class AuthConfig:
    # "dev": anonymous callers allowed (embedded default, announced at startup);
    # "jwt": every request needs a valid bearer JWT.
    mode: str = "dev"
    jwks_url: str = ""
    issuer: str = ""
    audience: str = ""
    public_keys: list[str] = field(default_factory=list)  # PEM files
    algorithms: list[str] = field(default_factory=lambda: ["ES256", "RS256"])
    dev_subject: str = "dev-user"
    dev_roles: dict[str, list[str]] = field(default_factory=lambda: {"*": ["owner", "operator", "reader"]})
    # Longest lifetime a caller's token may claim (exp - iat, or exp - now without iat); 0 = no cap.
    max_token_lifetime: float = 86400.0


@dataclass
class EventsConfig:
    signing_keys: list[str] = field(default_factory=list)  # PEM files, newest last
    # Where the signing keys live: "database" (the Gateway's database, shared by every replica;
    # the default unless signing_keys lists files), "files" (signing_keys), "generated" (a key
    # of this replica alone, under data_dir); "auto" picks files or database.
    key_store: str = "auto"
    key_refresh: float = 30.0  # seconds between re-reads of the database key ring
    token_ttl: float = 300.0
    algorithm: str = "ES256"
    client_queue_size: int = 1024
    heartbeat_interval: float = 15.0
    replay_buffer: int = 10_000
    # ControlBus consumer identity is "gateway-<instance_id>"; empty = generated per process.
    # Set it (e.g. to the pod name) so a restarted replica resumes from its committed offsets.
    instance_id: str = ""
    fallback_url: str = ""  # descriptor fallback_url; default: this Gateway's /ws (legacy route)
    ready_timeout: float = 10.0  # how long /ws/evt waits for the state rebuild before 1013
    max_connections: int = 10_000  # open /ws/evt + /ws connections in total (more: close 1013)
    max_connections_per_subject: int = 100  # per verified subject (more: close 4029)


@dataclass
class CallbacksConfig:
    # POST /callbacks/dag-event is service-to-service: the service token, or a source address
    # inside one of these CIDRs (for DAG Managers that send no credential). Empty = nobody by address.
    trusted_networks: list[str] = field(default_factory=list)
    max_clock_skew: float = 60.0  # an event's ts may lie at most this far in the future (seconds)


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str = ""  # default http://{host}:{port}
    worldservice_url: str = "http://127.0.0.1:8001"
    dagmanager_url: str = "http://127.0.0.1:8002"
    kv_url: str = "memory://"
    kv_prefix: str = "qmtl:gw:"  # prefix of every Redis key of this Gateway (its replicas share it)
    database_url: str = ""  # default sqlite under data_dir
    allow_live: bool = False
    insert_sentinel: bool = True
    validate_responses: bool = True
    decide_default_ttl: float = 300.0
    status_cache_ttl: float = 2.0
    worlds_cache_size: int = 10_000  # max entries of each worlds cache (decide, activation), LRU
    service_token: str = ""  # credential for WorldService's trusted identity headers
    worldservice_budget: BudgetConfig = field(default_factory=lambda: BudgetConfig(0.3, 2))
    dagmanager_budget: BudgetConfig = field(default_factory=lambda: BudgetConfig(0.5, 1))
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    # Values a client-chosen metric label (e.g. sentinel_id) may take before the rest fold into "other".
    metric_label_cap: int = 200
    fallback_queue_size: int = 10_000
    workers: int = 2
    # a diff request's budget grows with its work: dagmanager_budget.timeout + nodes x
    # diff_budget_ms_per_node + diffs x diff_budget_ms_per_diff (a POST /diff/batch carries
    # several); a 10,000-node diff costs ~330-450 ms on the DAG Manager: 0.5 ms/node leaves 10x
    diff_budget_ms_per_node: float = 0.5
    diff_budget_ms_per_diff: float = 100.0
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)

    def public_base_url(self) -> str:
        """The Gateway's address as its callers see it: ``public_url``, or ``http://{host}:{port}``."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"


@dataclass
class WorldServiceConfig:
    host: str = "127.0.0.1"
    port: int = 8001
    database_url: str = ""  # default sqlite under data_dir
    # "dev": callers without forwarded identity act as `dev_subject` with every role
    # (embedded default, announced at startup); "enforce": roles come only from the
    # identity the Gateway forwards with the service token.
    rbac: str = "dev"
    dev_subject: str = "dev-user"
    service_token: str = ""
    validate_responses: bool = True
    decision_ttl: str = "300s"
    apply_drain_seconds: float = 0.0
    # Replicas: an apply holds a lease on its world, renewed while it runs; another replica
    # rolls back an apply whose lease expired (its process died). The outbox publisher also
    # polls every outbox_poll_seconds for events another replica committed and did not publish.
    apply_lease_seconds: float = 30.0
    outbox_poll_seconds: float = 1.0
    database_schema: str = ""  # PostgreSQL schema (search_path) for the tables; default: the user's
    limits: LimitsConfig = field(default_factory=LimitsConfig)


@dataclass
class DagManagerConfig:
    host: str = "127.0.0.1"
    port: int = 8002
    database_url: str = ""  # default sqlite under data_dir
    gateway_callback_url: str = ""  # legacy HTTP callback to the Gateway (optional)
    # Sent as X-QMTL-Service-Token on callbacks to the Gateway, and required from callers of every
    # write (POST /diff, /gc, /callbacks/sentinel-traffic, DELETE /strategies/{id}). Empty: writes
    # are open (development only, warned at startup); `qmtl up` generates one shared token.
    service_token: str = ""
    kafka_admin: bool = False  # create data topics through the Kafka admin API
    queue_ttl_seconds: int = 7 * 24 * 3600
    gc_interval_seconds: float = 300.0
    database_schema: str = ""  # PostgreSQL schema (search_path) for the tables; default: the user's
    outbox_poll_seconds: float = 1.0  # how often the outbox publisher looks for events other replicas left
    validate_responses: bool = True
    metric_label_cap: int = 200  # distinct sentinel ids in metric labels before "other"
    limits: LimitsConfig = field(default_factory=LimitsConfig)


@dataclass
class Config:
    data_dir: str = ".qmtl"
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (one JSON object per line)
    access_log: bool = True  # one line per HTTP request on the qmtl.access logger
    tracing: TracingConfig = field(default_factory=TracingConfig)
    controlbus: BusConfig = field(default_factory=BusConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    worldservice: WorldServiceConfig = field(default_factory=WorldServiceConfig)
    dagmanager: DagManagerConfig = field(default_factory=DagManagerConfig)

    def db_url(self, service: str) -> str:
        database_url: str | None = getattr(self, service).database_url
        if database_url:
            return database_url
        return f"sqlite+aiosqlite:///{Path(self.data_dir).resolve() / (service + '.db')}"

    def gateway_public_url(self) -> str:
        return self.gateway.public_base_url()

    def ensure_service_token(self) -> str:
        """One shared credential between Gateway and WorldService; generated when unset."""
        token = (self.gateway.service_token or self.worldservice.service_token
                 or self.dagmanager.service_token or secrets.token_urlsafe(32))
        self.gateway.service_token = token
        self.worldservice.service_token = token
        self.dagmanager.service_token = token
        return token

    def masked(self) -> dict[str, Any]:
        d = asdict(self)
        for section in ("gateway", "worldservice", "dagmanager"):
            if d[section].get("service_token"):
                d[section]["service_token"] = "***"
        return d


def _merge(target: Any, data: Mapping[str, Any], where: str) -> None:
    known = {f.name: f for f in fields(target)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}; known: {', '.join(sorted(known))}")
        current = getattr(target, key)
        if is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}.{key}: expected a mapping, got {type(value).__name__}")
            _merge(current, value, f"{where}.{key}")
            continue
        expected = type(current)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if current is not None and not isinstance(value, expected) and not (expected is str and value is None):
            raise ConfigError(f"{where}.{key}: expected {expected.__name__}, got {value!r}")
        setattr(target, key, copy.deepcopy(value))


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        if not path:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def load_config(path: str | Path | None = None, *, environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """File (if any) → environment → explicit overrides (command-line flags)."""
    environ = os.environ if environ is None else environ
    cfg = Config()
    path = path or environ.get("QMTL_CONFIG") or None
    if path:
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(data, Mapping):
            raise ConfigError(f"config file {p}: expected a mapping at the top level")
        _merge(cfg, data, str(p))
    env = _env_overrides(environ)
    if env:
        _merge(cfg, env, "environment")
    if overrides:
        _merge(cfg, overrides, "command line")
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    if cfg.controlbus.kind not in ("inproc", "kafka"):
        raise ConfigError(f"controlbus.kind must be 'inproc' or 'kafka', got {cfg.controlbus.kind!r}")
    if cfg.controlbus.kind == "kafka" and not cfg.controlbus.bootstrap_servers:
        raise ConfigError("controlbus.bootstrap_servers is required when controlbus.kind is 'kafka'")
    if cfg.gateway.auth.mode not in ("dev", "jwt"):
        raise ConfigError(f"gateway.auth.mode must be 'dev' or 'jwt', got {cfg.gateway.auth.mode!r}")
    if cfg.gateway.events.key_store not in ("auto", "database", "files", "generated"):
        raise ConfigError(f"gateway.events.key_store must be 'auto', 'database', 'files' or 'generated', got {cfg.gateway.events.key_store!r}")
    if cfg.worldservice.rbac not in ("dev", "enforce"):
        raise ConfigError(f"worldservice.rbac must be 'dev' or 'enforce', got {cfg.worldservice.rbac!r}")
    import ipaddress

    for cidr in cfg.gateway.callbacks.trusted_networks:
        try:
            ipaddress.ip_network(str(cidr).strip(), strict=False)
        except ValueError as exc:
            raise ConfigError(f"gateway.callbacks.trusted_networks: {cidr!r} is not a CIDR network ({exc})") from None
    _check_limits(cfg)


def _check_limits(cfg: Config) -> None:
    for section in ("gateway", "worldservice", "dagmanager"):
        lim = getattr(cfg, section).limits
        for name in ("max_body_bytes", "max_json_depth", "max_header_bytes", "max_connections", "backlog"):
            if getattr(lim, name) < 1:
                raise ConfigError(f"{section}.limits.{name} must be at least 1, got {getattr(lim, name)!r}")
        for name in ("body_timeout", "header_timeout", "keep_alive_timeout"):
            if getattr(lim, name) <= 0:
                raise ConfigError(f"{section}.limits.{name} must be positive, got {getattr(lim, name)!r}")
        if lim.health_headroom < 0:
            raise ConfigError(f"{section}.limits.health_headroom must not be negative, got {lim.health_headroom!r}")
    rl = cfg.gateway.rate_limit
    if rl.mode not in ("auto", "enforce", "disabled"):
        raise ConfigError(f"gateway.rate_limit.mode must be 'auto', 'enforce' or 'disabled', got {rl.mode!r}")
    for name in ("read", "write"):
        budget = getattr(rl, name)
        if budget.rate <= 0 or budget.burst < 1:
            raise ConfigError(f"gateway.rate_limit.{name}: rate must be positive and burst at least 1, got {budget!r}")
    ev = cfg.gateway.events
    if ev.max_connections < 1 or ev.max_connections_per_subject < 1:
        raise ConfigError("gateway.events.max_connections and max_connections_per_subject must be at least 1")
