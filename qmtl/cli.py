"""``qmtl``: start the control plane.

* ``qmtl up``: Gateway, WorldService and DAG Manager in one process on embedded
  defaults (in-process ControlBus, SQLite files in ``--data-dir``, in-memory Redis
  substitute, development auth), prints the URLs, stops cleanly on Ctrl-C.
* ``qmtl gw`` / ``qmtl worldservice`` / ``qmtl dagmanager``: one service each.
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
import warnings
from typing import Any, Sequence

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
    _gateway_flags(gw)

    for name in ("worldservice", "dagmanager"):
        sp = sub.add_parser(name, help=f"start the {name}")
        _common(sp)
        sp.add_argument("--port", type=int)

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


async def _serve_all(apps: list[tuple[str, Any, str, int]]) -> None:
    import uvicorn

    servers = []
    for _name, app, host, port in apps:
        # No permessage-deflate: the Gateway serialises each event once for every subscriber;
        # compressing ~0.5 KB frames per client nearly doubles its CPU per frame (bench/bench_ws.py).
        # timeout_graceful_shutdown: open streaming responses (the legacy GET /queues/watch
        # NDJSON stream never ends by itself) must not hold a shutdown forever.
        # proxy_headers=False: a client address is the TCP peer's, never an X-Forwarded-For value
        # (uvicorn believes it from 127.0.0.1 by default, which would let a local caller claim a
        # trusted callback network, see gateway.callbacks.trusted_networks).
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", ws="websockets-sansio",
                                ws_per_message_deflate=False, timeout_graceful_shutdown=5, proxy_headers=False)
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
    try:
        asyncio.run(_serve_all(make_apps(cfg, services)))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
