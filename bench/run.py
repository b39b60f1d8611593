"""Run every benchmark in bench/, one after another, and print each one's output.

    make bench                       # all of them
    make bench ARGS="decide diff"    # a subset, by name (decide, diff, ws, wsmem, ingest, ingestcpu,
                                     # diffcpu, relay, statehash, ops, flood, slowloris, outage, tracing,
                                     # labels, replicas, watch)

Each benchmark measures its own in-run baseline and prints ratios (these machines are
noisy; absolute figures drift). They run one at a time so they do not slow each other.
It ends with every goal line the benchmarks printed (met / MISSED) and a count.
Exit status: 1 when any benchmark failed (e.g. lost submissions, non-200 answers).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {
    "decide": ["bench_decide.py"],
    "diff": ["bench_diff.py"],
    "ws": ["bench_ws.py"],
    "wsmem": ["bench_ws_memory.py"],
    "ingest": ["bench_ingest.py"],
    "ingestcpu": ["bench_ingest.py", "--rate", "300", "--seconds", "5", "--split"],
    "diffcpu": ["bench_diff_cpu.py"],
    "relay": ["bench_relay.py"],
    "statehash": ["bench_statehash.py"],
    "ops": ["bench_ops.py"],
    "flood": ["bench_flood.py"],
    "slowloris": ["bench_slowloris.py"],
    "outage": ["bench_outage.py"],
    "tracing": ["bench_tracing.py"],
    "labels": ["bench_label_series.py"],
    "replicas": ["bench_replicas.py"],
    "watch": ["bench_watch.py"],
}


def main(argv: list[str]) -> int:
    names = argv or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    failed: list[str] = []
    verdicts: list[tuple[str, str]] = []
    for name in names:
        cmd = [sys.executable, str(HERE / BENCHES[name][0]), *BENCHES[name][1:]]
        print(f"\n=== {name}: {' '.join(Path(c).name if i == 1 else c for i, c in enumerate(cmd))}", flush=True)
        started = time.monotonic()
        rc = _run(cmd, name, verdicts)
        print(f"=== {name}: exit {rc} in {time.monotonic() - started:.1f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if verdicts:
        print("\n=== goals (each line as its benchmark printed it)")
        for name, text in verdicts:
            print(f"  {name:<10} {text}")
        missed = sum(1 for _, text in verdicts if VERDICT_MISSED.search(text))
        print(f"=== {len(verdicts) - missed} met, {missed} missed")
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# a benchmark states each goal on one line, ending in its verdict ("met", "[met]", "[ok]",
# "MISSED", "[MISSED]"); the summary gathers those lines so `make bench` ends with every goal
VERDICT = re.compile(r"\b(met|MISSED)\b|\[(ok|met|MISSED)\]")
VERDICT_MISSED = re.compile(r"\bMISSED\b")


def _run(cmd: list[str], name: str, verdicts: list[tuple[str, str]]) -> int:
    with subprocess.Popen(cmd, cwd=HERE.parent, stdout=subprocess.PIPE, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if VERDICT.search(line):
                verdicts.append((name, " ".join(line.split())))
        return proc.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
