"""``qmtl``: start the control plane.

* ``qmtl up``: Gateway, WorldService and DAG Manager in one process on embedded
  defaults (in-process ControlBus, SQLite files in ``--data-dir``, in-memory Redis
  substitute, development auth), prints the URLs, stops cleanly on Ctrl-C.
* ``qmtl gw`` / ``qmtl worldservice`` / ``qmtl dagmanager``: one service each;
  ``qmtl gw --workers N`` serves one Gateway with N worker processes (each a replica).
* ``qmtl rotate-signing-key``: a new /ws/evt signing key in the Gateways' shared key ring.
* ``qmtl check-specs``: load and validate every spec; exit 1 with the reason if broken.

Config: ``--config FILE`` (one YAML, a section per service), environment
``QMTL__SECTION__KEY`` overrides, then the flags given here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

from qmtl import __version__
from qmtl.common.config import Config, ConfigError, load_config
from qmtl.common.logs import FORMATS, setup_logging

log = logging.getLogger("qmtl")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (a section per service)")
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--data-dir", help="directory for SQLite files and generated keys (default .qmtl)")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ...")
    p.add_argument("--log-format", default=None, choices=FORMATS, help="text (default) or json: one JSON object per line")


def _gateway_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-live", action="store_true", default=None, help="allow calls that can switch a world to live without X-Allow-Live: true")
    p.add_argument("--no-sentinel", action="store_true", default=None, help="do not insert a VersionSentinel node into ingested DAGs")
    p.add_argument("--auth-jwks-url", help="verify callers' bearer JWTs with the keys at this JWKS URL")
    p.add_argument("--auth-issuer", help="required JWT issuer")
    p.add_argument("--auth-audience", help="required JWT audience")
    p.add_argument("--public-url", help="URL clients use to reach this Gateway (for stream_url/fallback_url)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qmtl", description="QMTL control plane")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start Gateway, WorldService and DAG Manager in one process (embedded defaults)")
    _common(up)
    up.add_argument("--gateway-port", type=int)
    up.add_argument("--worldservice-port", type=int)
    up.add_argument("--dagmanager-port", type=int)
    _gateway_flags(up)

    gw = sub.add_parser("gw", help="start the Gateway")
    _common(gw)
    gw.add_argument("--port", type=int)
    gw.add_argument("--worldservice-url")
    gw.add_argument("--dagmanager-url")
    gw.add_argument("--workers", type=int, default=1,
                    help="serve this Gateway with N worker processes on one port; each is a replica (needs the Kafka "
                         "ControlBus and a shared Redis: see README, Production)")
    _gateway_flags(gw)

    for name in ("worldservice", "dagmanager"):
        sp = sub.add_parser(name, help=f"start the {name}")
        _common(sp)
        sp.add_argument("--port", type=int)

    rot = sub.add_parser("rotate-signing-key",
                         help="add a new /ws/evt signing key to the Gateways' shared key ring (gateway.events.key_store: database)")
    rot.add_argument("--config", help="YAML config file (its gateway section names the database)")
    rot.add_argument("--data-dir", help="directory of the embedded SQLite database (default .qmtl)")
    rot.add_argument("--stage", type=float, default=None,
                     help="seconds before the new key signs (default: two key_refresh periods, so every replica publishes it first)")

    sub.add_parser("check-specs", help="validate every spec in specs/ and exit")
    return parser


def _set(d: dict, path: str, value: Any) -> None:
    if value is None:
        return
    node = d
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def overrides_from_args(args: argparse.Namespace) -> dict:
    o: dict = {}
    _set(o, "data_dir", getattr(args, "data_dir", None))
    _set(o, "log_level", getattr(args, "log_level", None))
    _set(o, "log_format", getattr(args, "log_format", None))
    host = getattr(args, "host", None)
    cmd = args.command
    if cmd == "up":
        for svc in ("gateway", "worldservice", "dagmanager"):
            _set(o, f"{svc}.host", host)
        _set(o, "gateway.port", args.gateway_port)
        _set(o, "worldservice.port", args.worldservice_port)
        _set(o, "dagmanager.port", args.dagmanager_port)
    elif cmd in ("gw", "worldservice", "dagmanager"):
        svc = "gateway" if cmd == "gw" else cmd
        _set(o, f"{svc}.host", host)
        _set(o, f"{svc}.port", args.port)
    if cmd == "gw":
        _set(o, "gateway.worldservice_url", args.worldservice_url)
        _set(o, "gateway.dagmanager_url", args.dagmanager_url)
    if cmd in ("gw", "up"):
        _set(o, "gateway.allow_live", True if args.allow_live else None)
        _set(o, "gateway.insert_sentinel", False if args.no_sentinel else None)
        _set(o, "gateway.public_url", args.public_url)
        if args.auth_jwks_url or args.auth_issuer or args.auth_audience:
            _set(o, "gateway.auth.mode", "jwt")
        _set(o, "gateway.auth.jwks_url", args.auth_jwks_url)
        _set(o, "gateway.auth.issuer", args.auth_issuer)
        _set(o, "gateway.auth.audience", args.auth_audience)
    return o


def _embedded_wiring(cfg: Config) -> None:
    """``qmtl up``: the three services find each other on the configured ports."""
    g, w, d = cfg.gateway, cfg.worldservice, cfg.dagmanager
    host = lambda h: "127.0.0.1" if h in ("0.0.0.0", "::", "") else h  # noqa: E731
    g.worldservice_url = f"http://{host(w.host)}:{w.port}"
    g.dagmanager_url = f"http://{host(d.host)}:{d.port}"
    if not d.gateway_callback_url:
        d.gateway_callback_url = cfg.gateway_public_url()
    cfg.ensure_service_token()


def quiet_server(config: Any) -> Any:
    """A ``uvicorn.Server`` that leaves signals to its owner. Several servers share one process
    here (``qmtl up``), and the process stops them all at once on SIGINT/SIGTERM; uvicorn's own
    handling (``Server.capture_signals``, 0.29+: one handler per server, each re-raising the
    signal when its server stops) would let the first server to stop raise KeyboardInterrupt
    into the others' shutdown. Overriding that method is uvicorn's extension point for
    embedding (it replaced ``install_signal_handlers``, overridden too for older versions)."""
    import uvicorn

    class _Server(uvicorn.Server):
        def capture_signals(self) -> Any:
            return contextlib.nullcontext()

        def install_signal_handlers(self) -> None:
            return None

    return _Server(config)


def _run_loop(coro: Any) -> Any:
    """Run the services on uvloop (installed with ``uvicorn[standard]``; less event-loop CPU
    per request than the stdlib loop), the stdlib loop when it is missing."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _serve_all(apps: list[tuple[str, Any, str, int]]) -> None:
    import uvicorn

    from qmtl.contracts.server import server_options

    servers = []
    for _name, app, host, port in apps:
        # No permessage-deflate: the Gateway serialises each event once for every subscriber;
        # compressing ~0.5 KB frames per client nearly doubles its CPU per frame (bench/bench_ws.py).
        # timeout_graceful_shutdown: open streaming responses (the legacy GET /queues/watch
        # NDJSON stream never ends by itself) must not hold a shutdown forever.
        # proxy_headers=False: a client address is the TCP peer's, never an X-Forwarded-For value
        # (uvicorn believes it from 127.0.0.1 by default, which would let a local caller claim a
        # trusted callback network, see gateway.callbacks.trusted_networks).
        # server_options: header timeout and size, keep-alive timeout, connection cap with
        # headroom for /health (the service's `limits` section; qmtl.contracts.server).
        bounds = server_options(app.guard) if getattr(app, "guard", None) is not None else {}
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", ws="websockets-sansio",
                                ws_per_message_deflate=False, timeout_graceful_shutdown=5, proxy_headers=False,
                                **{"http": _http_impl(), **bounds})  # the bounded protocol is httptools' too
        server = quiet_server(config)  # we handle signals once for all
        servers.append(server)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)

    tasks = [asyncio.create_task(s.serve(), name=f"serve-{apps[i][0]}") for i, s in enumerate(servers)]
    for _ in range(1000):
        if all(s.started for s in servers) or any(t.done() for t in tasks):
            break
        await asyncio.sleep(0.01)
    failed = [t for t in tasks if t.done()]
    if not failed:
        # Everything built at startup (specs, schemas, validators, routes) lives as long as the
        # process: move it out of the collector's reach, so that full collections under load
        # scan only what requests create (measured: 150-250 ms gen-2 pauses during a
        # 1,000 req/s submission burst without this).
        gc.collect()
        gc.freeze()
        for name, _app, host, port in apps:
            shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
            print(f"{name:<13} http://{shown}:{port}   (docs: http://{shown}:{port}/docs)", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        done_task = asyncio.create_task(stop.wait())
        await asyncio.wait([done_task, *tasks], return_when=asyncio.FIRST_COMPLETED)
        done_task.cancel()
    for s in servers:
        s.should_exit = True
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for (name, *_rest), server, res in zip(apps, servers, results):
        if isinstance(res, BaseException) and not isinstance(res, asyncio.CancelledError):
            raise SystemExit(f"{name} failed: {res!r}")
        if not server.started:
            raise SystemExit(f"{name} could not start (port in use?)")
    print("stopped.", flush=True)


def _http_impl() -> str:
    """httptools (C parser) when installed, else h11 — chosen explicitly, not left to "auto"."""
    try:
        import httptools  # noqa: F401
    except ImportError:  # pragma: no cover
        return "h11"
    return "httptools"


def bus_options(cfg: Config) -> dict[str, Any]:
    """The ``controlbus`` config section as :func:`qmtl.bus.make_bus` options."""
    cb = cfg.controlbus
    if cb.kind == "kafka":
        return {"kind": "kafka", "bootstrap_servers": cb.bootstrap_servers, "num_partitions": cb.num_partitions,
                "create_topics": cb.create_topics, "fetch_max_wait_ms": cb.fetch_max_wait_ms}
    return {"kind": cb.kind, "partitions": cb.num_partitions}


def make_apps(cfg: Config, services: Sequence[str]) -> list[tuple[str, Any, str, int]]:
    from qmtl.bus import make_bus
    from qmtl.contracts.events import event_validators

    bus = make_bus(bus_options(cfg), validator=event_validators())
    if bus.in_process:
        # Only the services of this process share an in-process bus: one started alone on it
        # is loud (an ERROR line here, /ready 503 and, for the Gateway, /status degraded).
        bus.local_services = frozenset(services)
        from qmtl.bus import isolation_problem

        for svc in services:
            problem = isolation_problem(bus, svc)
            if problem:
                log.error("%s: %s", svc, problem)
    out = []
    for svc in services:
        if svc == "worldservice":
            from qmtl.worldservice.app import create_app as ws_app

            out.append(("WorldService", ws_app(cfg, bus=bus), cfg.worldservice.host, cfg.worldservice.port))
        elif svc == "dagmanager":
            from qmtl.dagmanager.app import create_app as dm_app

            out.append(("DAG Manager", dm_app(cfg, bus=bus), cfg.dagmanager.host, cfg.dagmanager.port))
        elif svc == "gateway":
            from qmtl.gateway.app import create_app as gw_app

            out.append(("Gateway", gw_app(cfg, bus=bus), cfg.gateway.host, cfg.gateway.port))
    return out


async def _rotate_signing_key(cfg: Config, stage: float | None) -> int:
    """Insert a new key into ``gw_signing_keys``; every replica publishes it, then signs with it."""
    from qmtl.gateway.events.keystore import DatabaseKeyStore
    from qmtl.store import Database

    ev = cfg.gateway.events
    if ev.key_store == "files" or (ev.key_store == "auto" and ev.signing_keys) or ev.key_store == "generated":
        print("the signing keys are not in the database (gateway.events.key_store); rotate files by adding the new PEM "
              "at the end of gateway.events.signing_keys on every replica", file=sys.stderr)
        return 2
    db = Database(cfg.db_url("gateway"))
    try:
        store = DatabaseKeyStore(db, algorithm=ev.algorithm, token_ttl=ev.token_ttl, owner="qmtl rotate-signing-key",
                                 refresh=ev.key_refresh)
        await store.load()
        key = await store.rotate(stage=stage)
    finally:
        await db.close()
    row = next(r for r in store.rows if r.key.kid == key.kid)
    print(f"new signing key {key.kid} ({key.algorithm}) signs from {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(row.signs_from))}; "
          f"the previous one verifies for {ev.token_ttl:g} s more")
    return 0


WORKER_ENV = "QMTL_GATEWAY_WORKER"


def worker_problems(cfg: Config) -> list[str]:
    """Why this config cannot run the Gateway as several worker processes (empty: it can)."""
    problems = []
    if cfg.controlbus.kind != "kafka":
        problems.append("the in-process ControlBus cannot span worker processes: set controlbus.kind: kafka")
    if cfg.gateway.kv_url.startswith("memory://"):
        problems.append("the in-memory Redis substitute is per process (a strategy accepted by one worker would be "
                        "unknown to the others): set gateway.kv_url to a Redis URL")
    if cfg.gateway.events.key_store in ("generated",):
        problems.append("gateway.events.key_store 'generated' gives each worker its own key: use 'database' or 'files'")
    return problems


def gateway_worker_app() -> Any:
    """The app factory of one ``qmtl gw --workers N`` process (``uvicorn --factory``).

    Each worker is a Gateway replica: its own ControlBus consumer identity (``gateway-<id>``
    with a per-process id; a configured ``gateway.events.instance_id`` gets ``-<pid>``), its
    own caches following the bus, the ingest FIFO and locks in the shared Redis, and the
    signing keys from the shared store, so a token issued by one worker verifies on all."""
    import os

    spec = json.loads(os.environ[WORKER_ENV])
    cfg = load_config(spec["config"], overrides=spec["overrides"])
    setup_logging(cfg.log_level, cfg.log_format)
    if cfg.gateway.events.instance_id:
        cfg.gateway.events.instance_id = f"{cfg.gateway.events.instance_id}-{os.getpid()}"
    return make_apps(cfg, ["gateway"])[0][1]


def _serve_workers(cfg: Config, args: argparse.Namespace, workers: int) -> int:
    import os

    import uvicorn

    problems = worker_problems(cfg)
    if problems:
        print("cannot serve the Gateway with --workers " + str(workers) + ":\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 2
    os.environ[WORKER_ENV] = json.dumps({"config": args.config, "overrides": overrides_from_args(args)})
    g = cfg.gateway
    shown = "127.0.0.1" if g.host in ("0.0.0.0", "") else g.host
    print(f"{'Gateway':<13} http://{shown}:{g.port}   ({workers} worker processes; docs: http://{shown}:{g.port}/docs)", flush=True)
    uvicorn.run("qmtl.cli:gateway_worker_app", factory=True, host=g.host, port=g.port, workers=workers, log_level="warning",
                lifespan="on", ws="websockets-sansio", ws_per_message_deflate=False, timeout_graceful_shutdown=5)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # Connexion imports starlette.testclient at import time (never used by a server), and
    # Starlette warns about that import; nothing an operator can act on.
    warnings.filterwarnings("ignore", message=r"Using `httpx` with `starlette\.testclient`")
    args = build_parser().parse_args(argv)
    if args.command == "check-specs":
        from qmtl.contracts.loader import SpecError, load_all

        try:
            load_all()
            from qmtl.contracts.events import event_validators

            event_validators()
        except SpecError as exc:
            print(f"spec error: {exc}", file=sys.stderr)
            return 1
        print("all specs valid")
        return 0
    try:
        cfg = load_config(args.config, overrides=overrides_from_args(args))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        setup_logging(cfg.log_level, cfg.log_format)
    except ValueError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "rotate-signing-key":
        return asyncio.run(_rotate_signing_key(cfg, args.stage))
    from qmtl.contracts.loader import SpecError, load_all

    try:
        load_all()  # a broken spec stops the service here, with the reason
    except SpecError as exc:
        print(f"spec error: {exc}", file=sys.stderr)
        return 1
    if args.command == "up":
        _embedded_wiring(cfg)
        services = ["worldservice", "dagmanager", "gateway"]
    else:
        services = ["gateway" if args.command == "gw" else args.command]
    log.info("config: %s", json.dumps(cfg.masked(), sort_keys=True))
    workers = getattr(args, "workers", 1) or 1
    if workers > 1:
        return _serve_workers(cfg, args, workers)
    try:
        _run_loop(_serve_all(make_apps(cfg, services)))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
