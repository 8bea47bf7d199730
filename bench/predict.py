"""What feature enrichment costs: `/v1/predict` against the bare model over `/v2`, in one run.

The shipped pricing model (deploy/models/gbr with its pipeline.json) is served by one `marquee
serve` with deploy/features.toml and a Redis online store filled for 10,000 users and 1,000 shows.
The same closed-loop client (tests/examples/http_load.rs, JSON over HTTP) then drives, each for
the same time at the same concurrency:

* `/v2/models/gbr/infer`: the ten encoded features sent as a tensor (what a caller does without
  Marquee's enrichment);
* `/v1/predict`: a user id, a show id and two request features; the server reads five features of
  two views from Redis (one round trip), encodes, runs the model and labels the answer. Every
  request names another user, so the response cache never answers.

    .marquee/venv/bin/python bench/predict.py [--concurrency 16] [--seconds 10]

Prints throughput and p50/p99 latency for both and their ratio; writes .marquee/bench/predict.json.
"""

import argparse
import json
import os
import pathlib
import subprocess
import tempfile
import time
import urllib.request

import suite_build
from loopback import free_port, wait_http

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOME = ROOT / ".marquee"
MARQUEE = ROOT / "target" / "release" / "marquee"
LOAD = ROOT / "target" / "release" / "examples" / "http_load"
OUT = HOME / "bench"

V2_BODY = json.dumps({"inputs": [{"name": "X", "shape": [1, 10], "datatype": "FP32",
                                  "data": [0.2, -0.1, 0.4, 1.0, 0.5, -1.4, 0.0, 0.3, 0.0, 1.0]}]})
V1_BODY = ('{"model": "gbr", "entities": {"user_id": "user-{i}", "show_id": "show-7"},'
           ' "features": {"hours_to_show": 5, "is_peak_hour": true}}')


def prepare():
    subprocess.run([str(ROOT / "deploy" / "setup.sh"), "--test"], check=True)
    subprocess.run([str(ROOT / "bench" / "peers" / "setup.sh"), str(HOME / "peers")], check=True)
    suite_build.build()


# Writes the offline history (run with the Feast environment's pyarrow).
WRITE_HISTORY = """
import sys, time, pathlib
import pyarrow as pa, pyarrow.parquet as pq
offline, now_ms = pathlib.Path(sys.argv[1]), int(time.time() * 1000)
(offline / "users").mkdir(parents=True)
(offline / "shows").mkdir(parents=True)
users = [f"user-{i}" for i in range(10_000)]
pq.write_table(pa.table({"user_id": users, "event_time": pa.array([now_ms] * len(users), pa.timestamp("ms")),
    "bookings_7d": [i % 5 for i in range(len(users))], "avg_ticket_price": [8.0 + (i % 9) for i in range(len(users))]}),
    offline / "users" / "part-0.parquet")
shows = [f"show-{i}" for i in range(1_000)]
pq.write_table(pa.table({"show_id": shows, "event_time": pa.array([now_ms] * len(shows), pa.timestamp("ms")),
    "occupancy": [(i % 10) / 10 for i in range(len(shows))], "popularity": [(i % 7) / 7 for i in range(len(shows))],
    "historical_demand": [(i % 5) / 5 for i in range(len(shows))]}), offline / "shows" / "part-0.parquet")
"""


def fill_redis(redis_url, work):
    """Writes user and show rows through `marquee features materialize` from Parquet history."""
    subprocess.run([str(HOME / "peers" / "venv-feast" / "bin" / "python"), "-c", WRITE_HISTORY, str(work / "offline")],
                   check=True)
    definitions = (ROOT / "deploy" / "features.toml").read_text()
    definitions = definitions.replace('name = "user_activity"\nentities = ["user"]\nttl = "7days"',
                                      'name = "user_activity"\nentities = ["user"]\nttl = "7days"\n'
                                      'source = { path = "offline/users", timestamp_column = "event_time" }')
    definitions = definitions.replace('name = "show_demand"\nentities = ["show"]\nttl = "1h"',
                                      'name = "show_demand"\nentities = ["show"]\nttl = "1h"\n'
                                      'source = { path = "offline/shows", timestamp_column = "event_time" }')
    (work / "features.toml").write_text(definitions)
    subprocess.run([str(MARQUEE), "features", "--definitions", str(work / "features.toml"), "--online", redis_url,
                    "materialize", "--view", "user_activity", "--view", "show_demand"], check=True,
                   stdout=subprocess.DEVNULL)
    return work / "features.toml"


def load(url, body, args):
    output = subprocess.run([str(LOAD), url, body, str(args.concurrency), str(args.seconds)],
                            check=True, capture_output=True, text=True)
    return json.loads(output.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--skip-prepare", action="store_true")
    args = parser.parse_args()
    if not args.skip_prepare:
        prepare()
    suite_build.use_libtorch()
    redis_port, http, grpc, metrics = free_port(), free_port(), free_port(), free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL)
    server = None
    try:
        time.sleep(0.3)
        redis_url = f"redis://127.0.0.1:{redis_port}/"
        with tempfile.TemporaryDirectory(dir=HOME) as tmp:
            features = fill_redis(redis_url, pathlib.Path(tmp))
            server = subprocess.Popen(
                [str(MARQUEE), "serve", "--model-repository", str(ROOT / "deploy" / "models"), "--features",
                 str(features), "--online-store", redis_url, "--host", "127.0.0.1", "--http-port", str(http),
                 "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "MARQUEE_LOG": "warn"})
            base = f"http://127.0.0.1:{http}"
            wait_http(f"{base}/v2/health/ready", server)
            check = urllib.request.Request(f"{base}/v1/predict", data=V1_BODY.replace("{i}", "1").encode(),
                                           headers={"content-type": "application/json"})
            with urllib.request.urlopen(check) as response:
                answer = json.load(response)
            assert answer["degraded"] == [], f"the store did not answer: {answer}"
            results = {
                "v2_bare": load(f"{base}/v2/models/gbr/infer", V2_BODY, args),
                "v1_enriched": load(f"{base}/v1/predict", V1_BODY, args),
            }
    finally:
        for process in (server, redis):
            if process is not None:
                process.kill()
                process.wait()
    print(f"\ngbr, HTTP JSON, concurrency {args.concurrency}, {args.seconds:g} s each\n")
    print(f"{'':14} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name, r in results.items():
        print(f"{name:14} {r['per_second']:9.0f} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['errors']:7d}")
    ratio = results["v1_enriched"]["per_second"] / results["v2_bare"]["per_second"]
    print(f"\n/v1/predict with enrichment / bare /v2 throughput: {ratio:.2f}")
    results["summary"] = {"v1_over_v2_throughput": ratio}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "predict.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
