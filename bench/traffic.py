"""What traffic management costs on the prediction path, in one run: `/v1/predict` throughput
with routing + the prediction log + the drift monitor on, against all three off.

Three `marquee serve` processes over the same repository (the shipped gbr pricing model as
versions 1 and 2, deploy/features.toml on the in-process store) are started at once and loaded
one at a time, in interleaved rounds, by the same closed-loop client (tests/examples/http_load.rs):

* `off`: no traffic policy, `--event-sink none`, `--drift-window-rows 0`;
* `on`: a 50/50 user-level split between the versions, every answer logged to Parquet files,
  the drift monitor judging windows of 1000 rows;
* `kafka`: the same with the log on a Kafka-protocol broker (tansu, loopback);
* `route`, `log`, `drift`: each part alone (the split; the Parquet log; the drift monitor), to
  say where the cost is;
* `two`: two versions served and no policy, each request naming its version (alternately, as a
  client-side 50/50 split would): what serving two versions costs without any routing, so that
  `route` against `two` is the router's own cost;
* `canary`: the split at 10% (a canary's first step), beside `route`'s 50%: each version has its
  own batcher, so a split makes smaller batches of each, and that costs more than the routing;
* `shadow`: every request also mirrored to version 2 after its answer went out. Besides the
  rounds at full load (where the mirrored work takes CPU from the primary), `off` and `shadow`
  take turns at one connection, where the machine has room: the primary's latency with the
  shadow against without.

A first round of one second per server warms it up (heap, caches, ONNX Runtime) and is not
counted.

At full load the client, the server and the broker share two cores, so any CPU the log spends
shows up as queueing in every request's latency. What "p99 unchanged" means for production is the
latency at a load the machine carries: `off`, `log`, `kafka` and `on` then take turns under the
open-loop client (tests/examples/open_load.rs) at the same offered rate, a fifth of `off`'s
measured throughput (`--offered-share`; at half, the open-loop client, which starts a task per
request, saturates the cores itself and even `off` fails requests), latency counted from each
request's scheduled send time (tokio's timer sends in 1 ms ticks, so p50 is about 1 ms for
every configuration).

Then the time from a broken canary to its rollback: a registry with gbr in production and
`fails_on_large` (tests/fixtures: a data-dependent Reshape that fails every batch holding a
large first feature) pushed after it, `POST /v1/models/gbr/deploy` under the same load, and the
seconds and canary requests until the deployment reads `rolled_back`.

Every request names another user and another `hours_to_show`, so the response cache never
answers and every row reaches the log and the drift windows.

    .marquee/venv/bin/python bench/traffic.py [--concurrency 16] [--seconds 5] [--rounds 3]

Prints per configuration the median throughput, p50/p99 latency and server CPU per request (from
/proc), the ratios against `off` (target: `on` >= 0.9 of `off`), the records per second the
Kafka sink delivered, and the rollback's time; writes .marquee/bench/traffic.json.
"""

import argparse
import json
import os
import pathlib
import shutil
import statistics
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
OPEN_LOAD = ROOT / "target" / "release" / "examples" / "open_load"
TANSU = HOME / "bin" / "tansu"
OUT = HOME / "bench"
TICKS = os.sysconf("SC_CLK_TCK")

# `{i}` restarts at 0 every round, so `seats_left` carries the round: no body repeats, and the
# response cache never answers.
BODY = ('{"model": "gbr", "entities": {"user_id": "user-{i}", "show_id": "show-7"},'
        ' "features": {"hours_to_show": {i}, "seats_left": ROUND, "is_peak_hour": true}}')
SPLIT = {"split": {"by": "user", "entity": "user_id"}, "salt": "bench"}
POLICIES = {share: {"control": 1, "variants": [{"name": "b", "version": 2, "share": share}], **SPLIT}
            for share in (10, 50)}
POLICIES["shadow"] = {"control": 1, "variants": [], "split": {"by": "request"},
                      "shadow": {"version": 2, "share": 100}}
# What the broken canary cannot take: the first feature, standardised, over 5.
BROKEN_BODY = ('{"model": "gbr", "entities": {"user_id": "user-{i}", "show_id": "show-7"},'
               ' "features": {"hours_to_show": {i}, "seats_left": 3, "occupancy": 9}}')


def repository(work, folder="models", versions=("1", "2")):
    """deploy/models/gbr as two versions (`versions`), both served, in `work/folder`."""
    model = work / folder / "gbr"
    model.mkdir(parents=True)
    source = ROOT / "deploy" / "models" / "gbr"
    config = (source / "config.pbtxt").read_text() + "\nversion_policy { all { } }\n"
    (model / "config.pbtxt").write_text(config)
    shutil.copy(source / "pipeline.json", model / "pipeline.json")
    for version in versions:
        (model / version).symlink_to(source / "1")
    return work / folder


def metric(port, series):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
        for line in response.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
    return 0.0


def cpu_seconds(pid):
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Served:
    def __init__(self, name, args, work, share=None, source=None, body=BODY):
        self.name, self.share, self.http, self.metrics = name, share, free_port(), free_port()
        self.body = body
        source = source or ["--model-repository", str(work / "models")]
        self.process = subprocess.Popen(
            [str(MARQUEE), "serve", *source, "--features",
             str(ROOT / "deploy" / "features.toml"), "--host", "127.0.0.1", "--http-port", str(self.http),
             "--grpc-port", str(free_port()), "--metrics-port", str(self.metrics), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "MARQUEE_LOG": "error"})
        self.base = f"http://127.0.0.1:{self.http}"
        self.rounds, self.light_rounds, self.offered_rounds = [], [], []

    def ready(self):
        wait_http(f"{self.base}/v2/health/ready", self.process)
        if self.share:
            send(f"{self.base}/v1/models/gbr/traffic", POLICIES[self.share], "PUT")

    def warm_up(self, args):
        body = self.body.replace("ROUND", "-1")
        subprocess.run([str(LOAD), f"{self.base}/v1/predict", body, str(args.concurrency), "1"],
                       check=True, capture_output=True)

    def load(self, args, round_number, concurrency=None):
        written = metric(self.metrics, 'marquee_event_log_records_total{outcome="written",sink="kafka"}')
        cpu = cpu_seconds(self.process.pid)
        body = self.body.replace("ROUND", str(round_number))
        output = subprocess.run([str(LOAD), f"{self.base}/v1/predict", body, str(concurrency or args.concurrency),
                                 str(args.seconds)], check=True, capture_output=True, text=True)
        result = json.loads(output.stdout)
        result["cpu_ms_per_request"] = (cpu_seconds(self.process.pid) - cpu) * 1e3 / max(result["requests"], 1)
        # The records this round handed to Kafka, once the log has caught up.
        deadline = time.time() + 30
        while time.time() < deadline and metric(self.metrics, 'marquee_event_log_buffered{sink="kafka"}') > 0:
            time.sleep(0.1)
        result["kafka_records"] = metric(
            self.metrics, 'marquee_event_log_records_total{outcome="written",sink="kafka"}') - written
        (self.light_rounds if concurrency == 1 else self.rounds).append(result)

    def offer(self, args, round_number, rate):
        """One open-loop round at `rate` requests per second."""
        cpu = cpu_seconds(self.process.pid)
        body = self.body.replace("ROUND", str(round_number))
        output = subprocess.run([str(OPEN_LOAD), f"{self.base}/v1/predict", body, f"{rate:.0f}", str(args.seconds)],
                                check=True, capture_output=True, text=True)
        result = json.loads(output.stdout)
        result["cpu_ms_per_request"] = (cpu_seconds(self.process.pid) - cpu) * 1e3 / max(result["answered"], 1)
        self.offered_rounds.append(result)

    def median(self, key, light=False, offered=False):
        rounds = self.offered_rounds if offered else self.light_rounds if light else self.rounds
        return statistics.median(r[key] for r in rounds)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def send(url, body, method="POST"):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method=method,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read() or b"null")


def registry_with_a_broken_canary(work):
    """gbr v1 in production, fails_on_large as v2, both with gbr's config and pipeline."""
    registry = str(work / "registry")
    source = ROOT / "deploy" / "models" / "gbr"
    manifest = work / "manifest.json"
    manifest.write_text(json.dumps({"pipeline": json.loads((source / "pipeline.json").read_text())}))

    def cli(*args):
        subprocess.run([str(MARQUEE), "registry", "--registry", registry, "--by", "bench", *args],
                       check=True, capture_output=True)

    for artifact in (source / "1" / "model.onnx", HOME / "fixtures" / "models" / "fails_on_large" / "1" / "model.onnx"):
        cli("push", "gbr", str(artifact), "--config", str(source / "config.pbtxt"), "--manifest", str(manifest))
    cli("promote", "gbr", "1", "--to", "staging")
    cli("promote", "gbr", "1", "--to", "production", "--approved-by", "bench")
    return registry


def time_to_rollback(args, work):
    """Seconds and canary requests from `POST .../deploy` of the broken version, under the
    closed-loop load, to the deployment reading `rolled_back` (polled every 20 ms)."""
    registry = registry_with_a_broken_canary(work)
    served = Served("rollback", ["--event-sink", "none", "--drift-window-rows", "0"], work,
                    source=["--registry", registry, "--registry-poll-seconds", "0.5"])
    try:
        served.ready()
        load = subprocess.Popen([str(LOAD), f"{served.base}/v1/predict", BROKEN_BODY, str(args.concurrency), "15"],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        started = time.monotonic()
        deployment = send(f"{served.base}/v1/models/gbr/deploy",
                          {"version": 2, "steps": [10, 50, 100], "step_seconds": 60})
        state = {}
        while time.monotonic() - started < 10:
            with urllib.request.urlopen(f"{served.base}/v1/deployments/{deployment['deployment_id']}") as response:
                state = json.loads(response.read())
            if state["status"] == "rolled_back":
                break
            time.sleep(0.02)
        seconds = time.monotonic() - started
        load.wait()
        decision = state["decisions"][-1]
        canary = (decision.get("windows") or {}).get("canary", {})
        return {"status": state["status"], "seconds": seconds, "reason": decision["reason"],
                "canary_requests": canary.get("requests"), "canary_errors": canary.get("server_errors"),
                "load": json.loads(load.stdout.read())}
    finally:
        served.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--offered-share", type=float, default=0.2,
                        help="the open-loop rounds' rate, as a share of off's throughput")
    parser.add_argument("--skip-prepare", action="store_true")
    args = parser.parse_args()
    if not args.skip_prepare:
        subprocess.run([str(ROOT / "deploy" / "setup.sh"), "--test"], check=True)
        suite_build.build()
    suite_build.use_libtorch()
    broker_port = free_port()
    broker = subprocess.Popen(
        [str(TANSU), "broker", "--listener-url", f"tcp://127.0.0.1:{broker_port}", "--advertised-listener-url",
         f"tcp://127.0.0.1:{broker_port}", "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers = []
    try:
        with tempfile.TemporaryDirectory(dir=HOME) as tmp:
            work = pathlib.Path(tmp)
            repository(work)
            repository(work, "models-two", ("10", "11"))
            nothing = ["--event-sink", "none", "--drift-window-rows", "0"]
            servers = [
                Served("off", nothing, work),
                Served("on", ["--event-sink", "parquet", "--events-dir", str(work / "events-on")], work, share=50),
                Served("kafka", ["--event-sink", "kafka", "--event-brokers", f"127.0.0.1:{broker_port}",
                                 "--events-dir", str(work / "events-kafka")], work, share=50),
                Served("two", nothing, work, source=["--model-repository", str(work / "models-two")],
                       body=BODY.replace('"model": "gbr",', '"model": "gbr", "version": "1{i%2}",')),
                Served("route", nothing, work, share=50),
                Served("canary", nothing, work, share=10),
                Served("shadow", nothing, work, share="shadow"),
                Served("log", ["--event-sink", "parquet", "--events-dir", str(work / "events-log"),
                               "--drift-window-rows", "0"], work),
                Served("drift", ["--event-sink", "none"], work),
            ]
            for served in servers:
                served.ready()
            for served in servers:
                served.warm_up(args)
            for round_number in range(args.rounds):
                for served in servers:
                    served.load(args, round_number)
            light = [s for s in servers if s.name in ("off", "shadow")]
            for round_number in range(args.rounds):
                for served in light:
                    served.load(args, args.rounds + round_number, concurrency=1)
            offered_rate = args.offered_share * servers[0].median("per_second")
            offered = [s for s in servers if s.name in ("off", "log", "kafka", "on")]
            for round_number in range(args.rounds):
                for served in offered:
                    served.offer(args, 2 * args.rounds + round_number, offered_rate)
            for served in servers:
                served.stop()
            rollback = time_to_rollback(args, work)
    finally:
        for served in servers:
            if served.process.poll() is None:
                served.process.kill()
        broker.kill()
        broker.wait()

    print(f"\ngbr /v1/predict, HTTP JSON, concurrency {args.concurrency}, {args.rounds} rounds of "
          f"{args.seconds:g} s, medians\n")
    print(f"{'':7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/req':>11} {'errors':>7}")
    summary = {}
    for served in servers:
        errors = sum(r["errors"] for r in served.rounds)
        print(f"{served.name:7} {served.median('per_second'):8.0f} {served.median('p50_ms'):8.3f} "
              f"{served.median('p99_ms'):8.3f} {served.median('cpu_ms_per_request'):11.3f} {errors:7d}")
        summary[served.name] = {key: served.median(key) for key in
                                ("per_second", "p50_ms", "p99_ms", "cpu_ms_per_request")}
    off, on, kafka = (summary[name] for name in ("off", "on", "kafka"))
    kafka_rate = statistics.median(r["kafka_records"] / args.seconds for r in servers[2].rounds)
    summary["ratios"] = {
        "on_over_off_throughput": on["per_second"] / off["per_second"],
        "kafka_over_off_throughput": kafka["per_second"] / off["per_second"],
        "on_over_off_p99": on["p99_ms"] / off["p99_ms"],
        "kafka_over_off_p99": kafka["p99_ms"] / off["p99_ms"],
        "kafka_records_per_second": kafka_rate,
        **{f"{name}_over_off_throughput": summary[name]["per_second"] / off["per_second"]
           for name in ("two", "route", "canary", "shadow", "log", "drift")},
        "route_over_two_throughput": summary["route"]["per_second"] / summary["two"]["per_second"],
        "on_over_two_throughput": on["per_second"] / summary["two"]["per_second"],
    }
    off_light, shadow_light = ({key: served.median(key, light=True) for key in ("per_second", "p50_ms", "p99_ms")}
                               for served in light)
    summary["one_connection"] = {"off": off_light, "shadow": shadow_light}
    summary["ratios"]["shadow_over_off_p50_one_connection"] = shadow_light["p50_ms"] / off_light["p50_ms"]
    summary["ratios"]["shadow_over_off_p99_one_connection"] = shadow_light["p99_ms"] / off_light["p99_ms"]
    print(f"\none connection: off p50 {off_light['p50_ms']:.3f} ms p99 {off_light['p99_ms']:.3f} ms "
          f"({off_light['per_second']:.0f} req/s); with a 100% shadow p50 {shadow_light['p50_ms']:.3f} ms "
          f"p99 {shadow_light['p99_ms']:.3f} ms ({shadow_light['per_second']:.0f} req/s)\n")
    print(f"open loop at {offered_rate:.0f} req/s offered ({args.offered_share:.0%} of off's throughput):")
    print(f"{'':7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/req':>11} {'errors':>7}")
    summary["offered"] = {"rate": offered_rate}
    for served in offered:
        failed = sum(r["errors"] + r["dropped"] for r in served.offered_rounds)
        print(f"{served.name:7} {served.median('per_second', offered=True):8.0f} "
              f"{served.median('p50_ms', offered=True):8.3f} {served.median('p99_ms', offered=True):8.3f} "
              f"{served.median('cpu_ms_per_request', offered=True):11.3f} {failed:7d}")
        summary["offered"][served.name] = {key: served.median(key, offered=True) for key in
                                           ("per_second", "p50_ms", "p99_ms", "cpu_ms_per_request")}
    for name in ("log", "kafka", "on"):
        summary["ratios"][f"{name}_over_off_p99_offered"] = (summary["offered"][name]["p99_ms"]
                                                             / summary["offered"]["off"]["p99_ms"])
    print()
    for key, value in summary["ratios"].items():
        print(f"{key:36} {value:10.2f}")
    print(f"\nbroken canary: {rollback['status']} {rollback['seconds']:.2f} s after the deploy call, after "
          f"{rollback['canary_requests']} canary requests ({rollback['canary_errors']} failed); "
          f"{rollback['reason']}")
    summary["rollback"] = rollback
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "traffic.json").write_text(json.dumps({"rounds": {s.name: s.rounds for s in servers},
                                                  "offered_rounds": {s.name: s.offered_rounds for s in offered},
                                                  "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
