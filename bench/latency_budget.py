"""The latency-budget batcher against fixed queue delays, under rising open-loop load, in one run.

The fraud-style model (deploy/models/iforest: ~2,700 tree nodes, a fixed cost per call, so batch
size decides throughput) is served by one `marquee serve`; between runs it is reloaded with another
`dynamic_batching` configuration through the repository API:

* fixed delays chosen by hand: `max_queue_delay_microseconds` 0, 500, 2000 and 8000;
* Marquee's `latency_budget_ms` (default 20) with `max_queue_delay_microseconds` 8000: the delay
  adapts between 0 and 8 ms to keep the p99 of queue wait plus compute within the budget.

For each configuration the open-loop client (tests/examples/open_load.rs, JSON over HTTP: requests
leave at a fixed rate whether or not earlier ones were answered) offers each rate in turn. Printed
per configuration and rate: answered requests per second, client-side p50/p99 (from each request's
scheduled send time, so it includes HTTP and JSON), the server's own p99 of queue plus compute
(the upper bound of its Prometheus histogram bucket, which doubles from 50 us), and server CPU
microseconds per request. Then, per rate, the budget's throughput as a ratio of the best fixed
delay's, and whether its p99 kept the budget (judged on the client's p99, which includes the
server's).

    .marquee/venv/bin/python bench/latency_budget.py [--rates 500 1000 2000 4000 8000] [--seconds 6]

Writes .marquee/bench/latency_budget.json. Client and server share the machine's cores: compare
ratios from one run, not absolute numbers across machines.
"""

import argparse
import json
import os
import pathlib
import subprocess
import time
import urllib.request

import suite_build
from loopback import free_port, wait_http

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOME = ROOT / ".marquee"
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"
MARQUEE = TARGET / "marquee"
LOAD = TARGET / "examples" / "open_load"
OUT = HOME / "bench"
TICKS = os.sysconf("SC_CLK_TCK")

ROW = [0.1, 0.2, 0.3, 0.1, 0.0, -0.2, 0.4, 0.1, 0.05]
BODY = json.dumps({"inputs": [{"name": "X", "shape": [1, 9], "datatype": "FP32", "data": ROW}]})


def config(delay_us, budget_ms=None):
    parameters = {"intra_op_thread_count": {"string_value": "1"}}
    if budget_ms is not None:
        parameters["latency_budget_ms"] = {"string_value": str(budget_ms)}
    return {
        "name": "iforest",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 256,
        "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [9]}],
        "output": [{"name": "label", "data_type": "TYPE_INT64", "dims": [1]},
                   {"name": "scores", "data_type": "TYPE_FP32", "dims": [1]}],
        "dynamic_batching": {"max_queue_delay_microseconds": delay_us,
                             "default_queue_policy": {"max_queue_size": 8192}},
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": parameters,
    }


def cpu_seconds(pid):
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def server_histogram(metrics_url):
    """Cumulative bucket counts of queue + compute (request duration) for iforest."""
    with urllib.request.urlopen(metrics_url) as response:
        text = response.read().decode()
    buckets = {}
    for line in text.splitlines():
        if line.startswith('marquee_request_duration_seconds_bucket{') and 'model="iforest"' in line:
            le = line.split('le="')[1].split('"')[0]
            buckets[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return buckets


def p99_between(before, after):
    """The p99 (upper bucket bound, ms) of the requests counted between two scrapes."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0
    if total <= 0:
        return float("nan")
    for bound, count in zip(bounds, counts):
        if count >= 0.99 * total:
            return bound * 1e3
    return float("inf")


def reload(base, model_config):
    body = json.dumps({"parameters": {"config": json.dumps(model_config)}}).encode()
    request = urllib.request.Request(f"{base}/v2/repository/models/iforest/load", data=body, method="POST",
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[500, 1000, 2000, 4000, 8000])
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--budget-ms", type=float, default=20)
    parser.add_argument("--skip-prepare", action="store_true")
    args = parser.parse_args()
    if not args.skip_prepare:
        subprocess.run([str(ROOT / "deploy" / "setup.sh")], check=True)
        suite_build.build()
    suite_build.use_libtorch()
    http, grpc, metrics = free_port(), free_port(), free_port()
    server = subprocess.Popen(
        [str(MARQUEE), "serve", "--model-repository", str(ROOT / "deploy" / "models"), "--host", "127.0.0.1",
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
         "--max-concurrent-requests", "8192"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "MARQUEE_LOG": "warn"})
    base, metrics_url = f"http://127.0.0.1:{http}", f"http://127.0.0.1:{metrics}/metrics"
    configurations = [(f"fixed {d} us", config(d)) for d in (0, 500, 2000, 8000)]
    configurations.append((f"budget {args.budget_ms:g} ms", config(8000, args.budget_ms)))
    results = {}
    try:
        wait_http(f"{base}/v2/health/ready", server)
        for name, model_config in configurations:
            reload(base, model_config)
            rows = []
            for rate in args.rates:
                before, cpu_before = server_histogram(metrics_url), cpu_seconds(server.pid)
                output = subprocess.run([str(LOAD), f"{base}/v2/models/iforest/infer", BODY, str(rate),
                                         str(args.seconds)], check=True, capture_output=True, text=True)
                run = json.loads(output.stdout)
                run["server_p99_ms"] = p99_between(before, server_histogram(metrics_url))
                run["server_cpu_us_per_request"] = (cpu_seconds(server.pid) - cpu_before) * 1e6 / max(run["answered"], 1)
                rows.append(run)
                print(f"{name:>14}  offered {rate:>6}/s  answered {run['per_second']:>8.1f}/s  "
                      f"p50 {run['p50_ms']:>7.2f} ms  p99 {run['p99_ms']:>8.2f} ms  server p99 <= "
                      f"{run['server_p99_ms']:>7.2f} ms  CPU {run['server_cpu_us_per_request']:>6.0f} us/req  "
                      f"errors {run['errors']} dropped {run['dropped']}", flush=True)
            results[name] = rows
    finally:
        server.terminate()
        server.wait()
    budget_name = configurations[-1][0]
    print(f"\n{budget_name} against the best fixed delay at each rate (throughput ratio; p99 within budget?)")
    summary = []
    for i, rate in enumerate(args.rates):
        fixed = [(n, results[n][i]) for n, _ in configurations[:-1]]
        best_name, best = max(fixed, key=lambda item: item[1]["per_second"])
        mine = results[budget_name][i]
        ratio = mine["per_second"] / max(best["per_second"], 1e-9)
        within = mine["p99_ms"] <= args.budget_ms
        summary.append({"rate": rate, "best_fixed": best_name, "ratio": ratio, "p99_ms": mine["p99_ms"],
                        "server_p99_ms": mine["server_p99_ms"], "within_budget": within})
        print(f"  {rate:>6}/s: {ratio:.2f}x {best_name} ({best['per_second']:.0f}/s); budget's p99 "
              f"{mine['p99_ms']:.2f} ms ({'within' if within else 'OVER'} {args.budget_ms:g} ms), the best fixed "
              f"delay's {best['p99_ms']:.2f} ms")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "latency_budget.json").write_text(json.dumps({"runs": results, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
