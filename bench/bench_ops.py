"""Server CPU per operation, `qmtl up` as users run it, load from wrk on the other core.

    .venv/bin/python bench/bench_ops.py                  # every row, 3 s each
    .venv/bin/python bench/bench_ops.py --duration 5

Rows (issue 16), each measured as the server's CPU (utime + stime of the server process
from /proc/<pid>/stat, which holds up on a noisy machine) divided by the requests wrk
completed, and as req/s; ratios are against a bare Starlette app serving the same JSON in
the same run (uvicorn, uvloop, httptools — the floor for any Python route):

* bare Starlette, same JSON                                      (baseline)
* Gateway, cached GET /worlds/{id}/decide (cache-hit fast path)
* Gateway, the same cache hit through the full Connexion stack     goal ≥ 0.5 of bare
* WorldService GET /worlds/{id}/decide, direct                     goal ≤ 300 µs/req
* Gateway, uncached decide (WorldService ttl 0), 32 distinct worlds in flight
                                                                  goal ≤ 500 µs/req, breaker never opens
* the same with ``qmtl gw`` and ``qmtl worldservice`` as two processes: the Gateway's own
  CPU per request (WorldService's printed beside it)            goal ≤ 500 µs/req
* Gateway, GET activation with If-None-Match → 304               goal ≤ 300 µs/req

The servers run pinned to core 0 and wrk to core 1 (taskset) when the machine has two
cores or more. `make bench` installs wrk (Debian package) when it is missing. Other
processes on the machine still compete; CPU per request is the figure to compare.
Exit status 1 when a goal is missed or an answer was unexpected.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORLD = "bench"
WORLDS = 32
CLK = os.sysconf("SC_CLK_TCK")
SERVER_CORE, LOAD_CORE = "0", "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(argv: list[str], core: str) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", core, *argv]
    return argv


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def wait_http(port: int, path: str = "/health", timeout: float = 40.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"nothing answered on port {port} within {timeout:.0f} s")


class Server:
    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = open(log, "ab")  # noqa: SIM115 - held for the server process's lifetime, closed in stop()
        self.proc = subprocess.Popen(pinned(argv, SERVER_CORE), stdout=self.log, stderr=self.log, env=env, cwd=ROOT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid  # taskset execs the command: same pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def qmtl_up(data: Path, ttl: str) -> tuple[Server, int, int]:
    gw, ws, dm = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMTL")}
    env.update(QMTL__LOG_LEVEL="WARNING", QMTL__WORLDSERVICE__DECISION_TTL=ttl)
    qmtl = str(ROOT / ".venv" / "bin" / "qmtl")
    srv = Server([qmtl, "up", "--data-dir", str(data), "--gateway-port", str(gw), "--worldservice-port", str(ws),
                  "--dagmanager-port", str(dm)], env, data / "server.log")
    wait_http(gw)
    return srv, gw, ws


def split_gateway(data: Path, ttl: str) -> tuple[Server, Server, int]:
    """``qmtl worldservice`` and ``qmtl gw`` as two processes (both pinned to the server
    core), so the Gateway's own CPU per request can be read apart from WorldService's."""
    gw, ws, dm = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMTL")}
    env.update(QMTL__LOG_LEVEL="WARNING", QMTL__WORLDSERVICE__DECISION_TTL=ttl)
    qmtl = str(ROOT / ".venv" / "bin" / "qmtl")
    wsrv = Server([qmtl, "worldservice", "--data-dir", str(data), "--port", str(ws)], env, data / "worldservice.log")
    wait_http(ws)
    gsrv = Server([qmtl, "gw", "--data-dir", str(data), "--port", str(gw), "--worldservice-url", f"http://127.0.0.1:{ws}",
                   "--dagmanager-url", f"http://127.0.0.1:{dm}"], env, data / "gateway.log")
    wait_http(gw)
    return wsrv, gsrv, gw


def bare_server(body_file: Path, port: int, log: Path) -> Server:
    code = (
        "import sys, uvloop, uvicorn\n"
        "from starlette.applications import Starlette\n"
        "from starlette.responses import Response\n"
        "from starlette.routing import Route\n"
        f"body = open({str(body_file)!r}, 'rb').read()\n"
        "async def decide(_r):\n"
        "    return Response(body, media_type='application/json')\n"
        "async def health(_r):\n"
        "    return Response(b'{}', media_type='application/json')\n"
        f"app = Starlette(routes=[Route('/worlds/{WORLD}/decide', decide), Route('/health', health)])\n"
        f"uvicorn.run(app, host='127.0.0.1', port={port}, log_level='warning', access_log=False, loop='uvloop', http='httptools')\n"
    )
    srv = Server([sys.executable, "-c", code], dict(os.environ), log)
    wait_http(port)
    return srv


LUA = """
paths = {PATHS}
counter = 0
safe = 0
other = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, paths[(counter % #paths) + 1])
end
response = function(status, headers, body)
  local cache = headers["X-QMTL-Cache"] or headers["x-qmtl-cache"]
  if cache == "safe-default" then safe = safe + 1 end
  if status ~= EXPECT then other = other + 1 end
end
local threads = {}
setup = function(thread) table.insert(threads, thread) end
done = function(summary, latency, requests)
  local s, o = 0, 0
  for _, t in ipairs(threads) do s = s + t:get("safe"); o = o + t:get("other") end
  io.write(string.format("QMTL safe=%d unexpected=%d\\n", s, o))
end
"""


def wrk(port: int, paths: list[str], *, duration: float, connections: int, headers: dict[str, str], expect: int, tmp: Path,
        pid: int, also: int | None = None) -> dict:
    """One measured wrk run; ``also``: another server process whose CPU per request is
    reported too (``also_cpu_us``)."""
    script = tmp / f"wrk-{abs(hash(tuple(paths))) % 10**8}.lua"
    script.write_text(LUA.replace("{PATHS}", "{" + ",".join(json.dumps(p) for p in paths) + "}").replace("EXPECT", str(expect)))
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "-s", str(script)]
    for k, v in headers.items():
        argv += ["-H", f"{k}: {v}"]
    argv.append(f"http://127.0.0.1:{port}")
    # warm-up (not measured)
    subprocess.run(pinned([*argv[:3], "-d1s", *argv[4:]], LOAD_CORE), capture_output=True, text=True)
    c0, a0 = cpu_seconds(pid), cpu_seconds(also) if also else 0.0
    out = subprocess.run(pinned(argv, LOAD_CORE), capture_output=True, text=True).stdout
    cpu = cpu_seconds(pid) - c0
    also_cpu = cpu_seconds(also) - a0 if also else 0.0
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99_ms = float(p99.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)] if p99 else float("nan")
    m = re.search(r"QMTL safe=(\d+) unexpected=(\d+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests": reqs, "rps": rps, "p99_ms": p99_ms, "cpu_us": cpu * 1e6 / max(reqs, 1), "also_cpu_us": also_cpu * 1e6 / max(reqs, 1),
            "safe": int(m.group(1)) if m else -1, "unexpected": int(m.group(2)) if m else -1,
            "non_2xx_3xx": int(errors.group(1)) if errors else 0}


def metric_sum(port: int, name: str, **labels: str) -> float:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=3.0, help="measured seconds per row (default 3)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--keep", action="store_true", help="keep the data dirs and server logs")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        print("wrk is not installed (make bench installs it: apt-get install -y wrk)", file=sys.stderr)
        return 2
    import httpx

    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="qmtl-bench-ops-"))
    rows: list[tuple[str, dict, str, bool]] = []
    servers: list[Server] = []
    try:
        # -- cached decisions (WorldService ttl 300 s), WorldService direct, activation 304
        (tmp / "cached").mkdir()
        srv, gw, ws = qmtl_up(tmp / "cached", "300s")
        servers.append(srv)
        with httpx.Client(base_url=f"http://127.0.0.1:{gw}", timeout=10) as c:
            assert c.post("/worlds", json={"world_id": WORLD, "name": "Bench world"}).status_code in (201, 409)
            c.get(f"/worlds/{WORLD}/decide")
            hit = c.get(f"/worlds/{WORLD}/decide")
            assert hit.headers.get("x-qmtl-cache") == "hit", hit.headers
            body = hit.content
            act_path = f"/worlds/{WORLD}/activation?strategy_id=s-bench&side=long"
            act = c.get(act_path)
            assert act.status_code == 200 and act.headers.get("etag"), (act.status_code, act.text)
            etag = act.headers["etag"]
        (tmp / "decide.json").write_bytes(body)
        bare_port = free_port()
        bare = bare_server(tmp / "decide.json", bare_port, tmp / "bare.log")
        servers.append(bare)
        d, k = args.duration, args.connections
        base = wrk(bare_port, [f"/worlds/{WORLD}/decide"], duration=d, connections=k, headers={}, expect=200, tmp=tmp, pid=bare.pid)
        rows.append(("bare Starlette, same JSON (baseline)", base, "", True))
        r = wrk(gw, [f"/worlds/{WORLD}/decide"], duration=d, connections=k, headers={}, expect=200, tmp=tmp, pid=srv.pid)
        rows.append(("Gateway decide, cache hit (fast path)", r, "", r["unexpected"] == 0))
        r = wrk(gw, [f"/worlds/{WORLD}/decide?via=stack"], duration=d, connections=k, headers={}, expect=200, tmp=tmp, pid=srv.pid)
        ratio = base["cpu_us"] / r["cpu_us"]
        rows.append(("Gateway decide, cache hit, full Connexion stack", r, f"bare/this CPU {ratio:.2f} (goal ≥ 0.5)",
                     ratio >= 0.5 and r["unexpected"] == 0))
        r = wrk(ws, [f"/worlds/{WORLD}/decide"], duration=d, connections=k, headers={}, expect=200, tmp=tmp, pid=srv.pid)
        rows.append(("WorldService decide, direct", r, "goal ≤ 300 µs", r["cpu_us"] <= 300 and r["unexpected"] == 0))
        r = wrk(gw, [act_path], duration=d, connections=k, headers={"If-None-Match": etag}, expect=304, tmp=tmp, pid=srv.pid)
        rows.append(("Gateway activation, If-None-Match → 304", r, "goal ≤ 300 µs", r["cpu_us"] <= 300 and r["unexpected"] == 0))

        # -- uncached decisions (WorldService ttl 0): 32 distinct worlds in flight
        (tmp / "uncached").mkdir()
        srv2, gw2, _ws2 = qmtl_up(tmp / "uncached", "0s")
        servers.append(srv2)
        worlds = [f"{WORLD}{i}" for i in range(WORLDS)]
        with httpx.Client(base_url=f"http://127.0.0.1:{gw2}", timeout=10) as c:
            for w in worlds:
                assert c.post("/worlds", json={"world_id": w, "name": w}).status_code in (201, 409)
            miss = c.get(f"/worlds/{worlds[0]}/decide")
            assert miss.status_code == 200 and miss.headers.get("x-qmtl-cache") == "miss", miss.headers
        opened_before = metric_sum(gw2, "gateway_backend_requests_total", backend="worldservice", status="circuit_open")
        r = wrk(gw2, [f"/worlds/{w}/decide" for w in worlds], duration=d, connections=WORLDS, headers={}, expect=200, tmp=tmp,
                pid=srv2.pid)
        refused = metric_sum(gw2, "gateway_backend_requests_total", backend="worldservice", status="circuit_open") - opened_before
        ok = r["cpu_us"] <= 500 and r["safe"] == 0 and refused == 0 and r["unexpected"] == 0
        rows.append((f"Gateway decide, uncached (ttl 0), {WORLDS} worlds", r,
                     f"goal ≤ 500 µs; safe defaults {r['safe']}, breaker refusals {refused:.0f}", ok))
        srv2.stop()

        # -- the same, the Gateway and WorldService as two processes: the Gateway's own share
        (tmp / "split").mkdir()
        wsrv, gsrv, gw3 = split_gateway(tmp / "split", "0s")
        servers += [wsrv, gsrv]
        with httpx.Client(base_url=f"http://127.0.0.1:{gw3}", timeout=10) as c:
            for w in worlds:
                assert c.post("/worlds", json={"world_id": w, "name": w}).status_code in (201, 409)
        opened_before = metric_sum(gw3, "gateway_backend_requests_total", backend="worldservice", status="circuit_open")
        r = wrk(gw3, [f"/worlds/{w}/decide" for w in worlds], duration=d, connections=WORLDS, headers={}, expect=200, tmp=tmp,
                pid=gsrv.pid, also=wsrv.pid)
        refused = metric_sum(gw3, "gateway_backend_requests_total", backend="worldservice", status="circuit_open") - opened_before
        ok = r["cpu_us"] <= 500 and r["safe"] == 0 and refused == 0 and r["unexpected"] == 0
        note = (f"goal ≤ 500 µs (WorldService {r['also_cpu_us']:.0f} µs/req besides); safe defaults {r['safe']}, "
                f"breaker refusals {refused:.0f}")
        rows.append(("  the same, Gateway process alone (qmtl gw)", r, note, ok))
    finally:
        for s in servers:
            s.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"server CPU per request (qmtl up pinned to core {SERVER_CORE}, wrk -t1 on core {LOAD_CORE}, {args.connections} connections, "
          f"{args.duration:g} s per row); load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    print(f"  {'operation':<50}{'CPU µs/req':>11}{'req/s':>9}{'p99 ms':>8}{'x bare':>8}  goal")
    failed = False
    for name, r, goal, ok in rows:
        print(f"  {name:<50}{r['cpu_us']:>11.0f}{r['rps']:>9.0f}{r['p99_ms']:>8.1f}{r['cpu_us'] / base['cpu_us']:>8.1f}  "
              f"{goal}{'' if not goal else ('  [met]' if ok else '  [MISSED]')}")
        failed |= not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
