"""Online feature lookup, measured three ways against the same Redis in one run:

* Marquee: `marquee_feature_store::RedisStore::read` of 100 entities x 20 features (the call
  `/v1/predict` makes), from feature-store/examples/lookup_bench.rs;
* Feast (PyPI `feast`, Redis online store): `FeatureStore.get_online_features` of the same
  shape, values written with `write_to_online_store`;
* the ceiling: `redis-benchmark` sending the same 100 pipelined HMGETs (`_ts`, `_row`: Marquee
  keeps a row as one JSON field) from one client, with no client-side work at all.

    .marquee/venv/bin/python bench/features.py [--entities 100] [--features 20] [--repeats 2000]

Needs redis-server (deploy/setup.sh --test) and Feast (bench/peers/setup.sh .marquee/peers); the
script runs both. Prints medians and p99s in microseconds and the ratios the project tracks, and writes
them to .marquee/bench/features.json.
"""

import argparse
import json
import pathlib
import re
import socket
import subprocess
import tempfile
import textwrap
import time

import suite_build
from loopback import free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOME = ROOT / ".marquee"
FEAST_VENV = HOME / "peers" / "venv-feast"
OUT = HOME / "bench"

# Runs inside Feast's own environment: a feature repository on the given Redis, values written,
# then timed retrievals. Prints one JSON object.
FEAST_SIDE = textwrap.dedent(
    """
    import json, pathlib, statistics, sys, time
    from datetime import datetime, timedelta, timezone
    import pandas as pd
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource
    from feast.types import Float32

    repo, port, entities, features, repeats = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    path = pathlib.Path(repo)
    (path / "feature_store.yaml").write_text(
        "project: bench\\nregistry: registry.db\\nprovider: local\\n"
        "online_store:\\n  type: redis\\n  connection_string: 127.0.0.1:" + port + "\\n"
        "offline_store:\\n  type: file\\nentity_key_serialization_version: 3\\n"
    )
    names = [f"f{i}" for i in range(features)]
    now = datetime.now(timezone.utc)
    frame = pd.DataFrame({"user_id": [f"user-{i}" for i in range(entities)], "event_timestamp": [now] * entities,
                          **{n: [float(i * features + j) / 7 for i in range(entities)] for j, n in enumerate(names)}})
    frame.to_parquet(path / "source.parquet")
    user = Entity(name="user", join_keys=["user_id"])
    view = FeatureView(name="bench", entities=[user], ttl=timedelta(days=1),
                       schema=[Field(name=n, dtype=Float32) for n in names],
                       source=FileSource(path=str(path / "source.parquet"), timestamp_field="event_timestamp"))
    store = FeatureStore(repo_path=str(path))
    store.apply([user, view])
    store.write_to_online_store("bench", frame)
    refs = [f"bench:{n}" for n in names]
    rows = [{"user_id": f"user-{i}"} for i in range(entities)]
    for _ in range(max(1, repeats // 10)):
        store.get_online_features(features=refs, entity_rows=rows).to_dict()
    micros = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = store.get_online_features(features=refs, entity_rows=rows).to_dict()
        micros.append((time.perf_counter() - started) * 1e6)
    assert all(v is not None for v in result["f0"]), "every entity is found"
    micros.sort()
    print(json.dumps({"median_us": micros[len(micros) // 2], "p99_us": micros[min(len(micros) - 1, int(len(micros) * 0.99))]}))
    """
)


def start_redis(port):
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")


def prepare():
    subprocess.run([str(ROOT / "deploy" / "setup.sh"), "--test"], check=True)
    subprocess.run([str(ROOT / "bench" / "peers" / "setup.sh"), str(HOME / "peers")], check=True)
    suite_build.build()


def marquee(port, args):
    output = subprocess.run(
        [str(ROOT / "target" / "release" / "examples" / "lookup_bench"), f"redis://127.0.0.1:{port}/",
         str(args.entities), str(args.features), str(args.repeats)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(output.stdout)


def feast(port, args):
    with tempfile.TemporaryDirectory() as repo:
        output = subprocess.run(
            [str(FEAST_VENV / "bin" / "python"), "-c", FEAST_SIDE, repo, str(port),
             str(args.entities), str(args.features), str(args.repeats // 10)],
            check=True, capture_output=True, text=True,
        )
    return json.loads(output.stdout.strip().splitlines()[-1])


def ceiling(port, args):
    """One client, `entities` pipelined HMGETs of one stored row: Redis's own floor for the call."""
    output = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-c", "1", "-P", str(args.entities), "-n", str(args.entities * 2000),
         "-q", "HMGET", "marquee:bench:user-1", "_ts", "_row"],
        check=True, capture_output=True, text=True,
    )
    per_second = float(re.findall(r"([\d.]+) requests per second", output.stdout)[-1])
    return {"median_us": args.entities / per_second * 1e6}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, default=100)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--skip-prepare", action="store_true")
    args = parser.parse_args()
    if not args.skip_prepare:
        prepare()
    suite_build.use_libtorch()
    port = free_port()
    redis = start_redis(port)
    try:
        results = {"marquee": marquee(port, args), "feast": feast(port, args), "redis_benchmark": ceiling(port, args)}
    finally:
        redis.kill()
        redis.wait()
    print(f"\nlookup of {args.entities} entities x {args.features} features, one client, loopback Redis (µs)\n")
    print(f"{'':16} {'median':>9} {'p99':>9}")
    for name, result in results.items():
        p99 = result.get("p99_us")
        print(f"{name:16} {result['median_us']:9.0f} {'-' if p99 is None else round(p99):>9}")
    ratio = results["feast"]["median_us"] / results["marquee"]["median_us"]
    over_ceiling = results["marquee"]["median_us"] / results["redis_benchmark"]["median_us"]
    print(f"\nFeast / Marquee (median): {ratio:.1f}x; Marquee / redis-benchmark ceiling: {over_ceiling:.2f}x;"
          f" Marquee p99 {results['marquee']['p99_us'] / 1000:.3f} ms")
    results["summary"] = {"feast_over_marquee": ratio, "marquee_over_ceiling": over_ceiling}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "features.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
