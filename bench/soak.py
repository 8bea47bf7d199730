"""Soak: the fraud-style model over gRPC at 80% of the throughput measured a moment before, for
a long run, watching for errors, memory growth and latency drift.

1. One `marquee serve` over the example repository (deploy/models: iforest is the fraud-style
   model, an IsolationForest whose calls cost the same at any batch size, so the batcher matters).
2. Its maximum: the open-loop gRPC client (tests/examples/grpc_load.rs) offers far more than it can
   answer for --probe-seconds; what it answers per second is the maximum.
3. The soak: 80% of that, open loop, for --minutes, reported per minute: answered per second,
   errors, dropped (the client's own bound on requests in flight), p50/p99 from each request's
   scheduled send time, and the server's resident memory (VmRSS) at the end of the minute.
4. The verdict, printed: errors (target 0), RSS growth from the end of minute 2 to the end (target
   under 5%), and p99 stability (the spread of the per-minute p99 after minute 2).

    .marquee/venv/bin/python bench/soak.py [--minutes 10] [--load 0.8] [--probe-seconds 15]

Writes .marquee/bench/soak.json. Client and server share the machine's cores, so the maximum is
the pair's, not the server's alone; the soak judges the server at a steady high load, not speed.
"""

import argparse
import json
import os
import pathlib
import subprocess
import threading
import time
import urllib.request

import suite_build
from loopback import free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOME = ROOT / ".marquee"
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"
MARQUEE = TARGET / "marquee"
LOAD = TARGET / "examples" / "grpc_load"
OUT = HOME / "bench"
MODEL, WIDTH = "iforest", 9


def build():
    subprocess.run([str(ROOT / "deploy/setup.sh")], check=True, cwd=ROOT)
    suite_build.build()


def start():
    ports = [free_port() for _ in range(3)]
    log = open(OUT / "soak-server.log", "w")
    process = subprocess.Popen(
        [str(MARQUEE), "serve", "--model-repository", str(ROOT / "deploy/models"), "--host", "127.0.0.1",
         "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MARQUEE_LOG": "warn"},
    )
    deadline = time.time() + 120
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"marquee serve exited; see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return process, f"http://127.0.0.1:{ports[1]}"
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError("marquee serve did not become ready")
        time.sleep(0.2)


def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def load(address, rate, seconds, report_seconds):
    """Runs the open-loop client; returns its per-interval lines and its total."""
    result = subprocess.run([str(LOAD), address, MODEL, str(WIDTH), str(rate), str(seconds), str(report_seconds)],
                            capture_output=True, text=True, check=True, timeout=seconds + 300)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return [l for l in lines if "interval" in l], next(l for l in lines if l.get("total"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--load", type=float, default=0.8, help="share of the measured maximum to offer")
    parser.add_argument("--probe-seconds", type=float, default=15)
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    if args.minutes < 3:
        parser.error("--minutes must be at least 3: the verdict compares minute 2 with the end")
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.no_build:
        build()
    suite_build.use_libtorch()
    process, address = start()
    try:
        _, probe = load(address, 100_000, args.probe_seconds, args.probe_seconds)
        maximum = probe["per_second"]
        rate = max(1.0, maximum * args.load)
        print(f"maximum over gRPC ({MODEL}, 1 row per request, open loop saturated): {maximum:.0f} infer/s; "
              f"soaking at {args.load:.0%} = {rate:.0f}/s for {args.minutes:g} min", flush=True)
        samples = []  # (seconds since the soak started, RSS MB)

        def watch(stop):
            begun = time.time()
            while not stop.wait(5):
                if process.poll() is not None:
                    raise RuntimeError("marquee serve exited during the soak; see soak-server.log")
                samples.append((time.time() - begun, rss_mb(process.pid)))

        stop = threading.Event()
        watcher = threading.Thread(target=watch, args=(stop,), daemon=True)
        rss_start = rss_mb(process.pid)
        watcher.start()
        intervals, total = load(address, rate, args.minutes * 60, 60)
        stop.set()
        watcher.join()
        if process.poll() is not None:
            raise RuntimeError("marquee serve exited during the soak; see soak-server.log")
    finally:
        process.terminate()
        process.wait(timeout=30)

    def rss_at(second):
        before = [mb for t, mb in samples if t <= second]
        return before[-1] if before else rss_start

    print("\n| minute | answered/s | errors | dropped | p50 ms | p99 ms | server RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for i in intervals:
        print(f"| {i['interval'] + 1} | {i['per_second']:.0f} | {i['errors']} | {i['dropped']} | "
              f"{i['p50_ms']:.2f} | {i['p99_ms']:.2f} | {rss_at((i['interval'] + 1) * 60):.1f} |")
    settled = [i for i in intervals if i["interval"] >= 2] or intervals
    p99s = [i["p99_ms"] for i in settled]
    rss_from, rss_to = rss_at(120), (samples[-1][1] if samples else rss_start)
    growth = (rss_to - rss_from) / rss_from * 100
    verdict = {
        "model": MODEL, "maximum_per_second": maximum, "offered_per_second": rate, "minutes": args.minutes,
        "answered": total["answered"], "errors": total["errors"], "error_codes": total.get("error_codes", {}),
        "dropped": total["dropped"],
        "rss_start_mb": rss_start, "rss_minute2_mb": rss_from, "rss_end_mb": rss_to, "rss_growth_percent": growth,
        "p99_ms_after_minute_2": {"min": min(p99s), "median": sorted(p99s)[len(p99s) // 2], "max": max(p99s)},
        "intervals": intervals,
    }
    (OUT / "soak.json").write_text(json.dumps(verdict, indent=1))
    print(f"\nanswered {total['answered']} requests, {total['errors']} errors (target 0; by gRPC code: "
          f"{total.get('error_codes') or 'none'}), {total['dropped']} dropped by the client")
    print(f"server RSS {rss_from:.1f} MB after minute 2 -> {rss_to:.1f} MB at the end: {growth:+.2f}% (target < 5%)")
    print(f"p99 per minute after minute 2: min {min(p99s):.2f} / median {verdict['p99_ms_after_minute_2']['median']:.2f} "
          f"/ max {max(p99s):.2f} ms")


if __name__ == "__main__":
    main()
