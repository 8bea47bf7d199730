"""Marquee beside Triton (PyTriton), MLServer and raw in-process ONNX Runtime, in one run, with one
client (perf_analyzer) and the same models, so the ratios it prints compare like with like.

    .marquee/venv/bin/python bench/compare.py [--quick] [--servers marquee triton mlserver]
                                              [--models gbr iforest minilm] [--concurrency 1 8 32 64]

Needs `deploy/setup.sh --test` (perf_analyzer, models) and `bench/peers/setup.sh .marquee/peers`
(the peers); the script runs both, and builds Marquee, before it measures. Servers run one at a
time on loopback; the client shares the machine's cores with the server, as it would for any peer.
Prints throughput (infer/s), p50/p99 latency and server CPU per inference (the server process
tree's CPU time over the inferences it served during the run, by its own statistics) per server,
model, protocol and concurrency, the ratios the project tracks, and writes everything to
.marquee/bench/results.json. On 2 shared cores throughput is bound by the client; CPU per
inference is not.
"""

import argparse
import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import onnxruntime as ort

import suite_build

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOME = ROOT / ".marquee"
PERF_ANALYZER = HOME / "perf" / "bin" / "perf_analyzer"
PEERS = HOME / "peers"
OUT = HOME / "bench"
SEQ_LEN = 16  # MiniLM requests carry 16 tokens

# What each server speaks on which port, and how perf_analyzer must talk to it over HTTP
# (MLServer does not implement the binary tensor extension).
SERVERS = {
    "marquee": {"http": 8000, "grpc": 8001, "http_format": "binary"},
    "triton": {"http": 8000, "grpc": 8001, "http_format": "binary"},
    "mlserver": {"http": 8080, "grpc": 8081, "http_format": "json"},
}

# Marquee's iforest with Triton's default scheduler instead of the dynamic batcher.
IFOREST_UNBATCHED = {
    "name": "iforest",
    "platform": "onnxruntime_onnx",
    "max_batch_size": 256,
    "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
    "parameters": {"intra_op_thread_count": {"string_value": "1"}},
}


def run(command, **kwargs):
    subprocess.run(command, check=True, cwd=ROOT, **kwargs)


def prepare(servers):
    run([str(ROOT / "deploy" / "setup.sh"), "--test"])
    if "triton" in servers or "mlserver" in servers:
        run([str(ROOT / "bench" / "peers" / "setup.sh"), str(PEERS)])
    suite_build.build()
    inputs = OUT / "inputs"
    run([sys.executable, str(ROOT / "bench" / "peers" / "make_inputs.py"), str(inputs), "--seq-len", str(SEQ_LEN)])
    return inputs


def start(server, models, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    if server == "marquee":
        command = [str(ROOT / "target" / "release" / "marquee"), "serve", "--model-repository",
                   str(ROOT / "deploy" / "models"), "--host", "127.0.0.1"]
        env["MARQUEE_LOG"] = "warn"
    elif server == "triton":
        command = [str(PEERS / "venv-triton" / "bin" / "python"), str(ROOT / "bench" / "peers" / "triton_server.py"), *models]
    else:
        command = [str(PEERS / "venv-mlserver" / "bin" / "python"), str(ROOT / "bench" / "peers" / "mlserver_server.py"), *models]
    log = open(OUT / f"{server}.log", "w")
    # A process group of its own (to stop its children too) but the client's session: in another
    # session Linux's autogroup scheduling splits the CPU between server and client by session,
    # which starves perf_analyzer's own threads and can stall its measurement.
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, process_group=0)
    port = SERVERS[server]["http"]
    deadline = time.time() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{server} exited while starting; see {log.name}")
        if all(ready(port, f"/v2/models/{m}/ready") for m in models):
            return process
        if time.time() > deadline:
            stop(process)
            raise RuntimeError(f"{server} did not become ready; see {log.name}")
        time.sleep(1)


def ready(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def stop(process):
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def tree_cpu_seconds(pid):
    """User + system CPU time of `pid` and every process below it (PyTriton runs tritonserver as a
    child; MLServer forks workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append((int(entry), int(fields[11]) + int(fields[12])))
    total, stack = 0, [pid]
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total = int(fields[11]) + int(fields[12])
    except OSError:
        return None
    while stack:
        for child, used in children.get(stack.pop(), []):
            total += used
            stack.append(child)
    return total / ticks


def served(server, model):
    """Inferences the server has run for `model` (its statistics extension, or MLServer's
    Prometheus metrics); None when it does not say."""
    port = SERVERS[server]["http"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{model}/stats", timeout=5) as r:
            stats = json.load(r)
        return sum(int(s.get("inference_count", 0)) for s in stats.get("model_stats", []))
    except (OSError, ValueError):
        pass
    try:
        with urllib.request.urlopen("http://127.0.0.1:8082/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    # MLServer 1.7 counts requests as its latency histogram's `_count` (a success counter, where a
    # version has one, is preferred).
    counts = {}
    for line in text.splitlines():
        for name in ("model_infer_request_success", "model_infer_request_duration_count"):
            if line.startswith(name) and f'model="{model}"' in line:
                counts[name] = counts.get(name, 0) + float(line.rsplit(" ", 1)[1])
    # No series yet means no request yet.
    return counts.get("model_infer_request_success", counts.get("model_infer_request_duration_count", 0.0))


def perf(server, model, protocol, concurrency, inputs, window_ms, pid=None):
    spec = SERVERS[server]
    url = f"127.0.0.1:{spec[protocol]}"
    with tempfile.NamedTemporaryFile(suffix=".csv", dir=OUT, delete=False) as report:
        report_path = pathlib.Path(report.name)
    command = [str(PERF_ANALYZER), "-m", model, "-u", url, "-i", protocol, "-b", "1",
               "--input-data", str(inputs / f"{model}.json"), "--concurrency-range", str(concurrency),
               "-p", str(window_ms), "-s", "1000", "-r", "3", "-f", str(report_path)]
    if model == "minilm":
        command += [f"--shape={name}:{SEQ_LEN}" for name in ("input_ids", "attention_mask", "token_type_ids")]
    if protocol == "http":
        command += ["--input-tensor-format", spec["http_format"], "--output-tensor-format", spec["http_format"]]
    row = {"server": server, "model": model, "protocol": protocol, "concurrency": concurrency}
    cpu_before, count_before = (tree_cpu_seconds(pid), served(server, model)) if pid else (None, None)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=window_ms * 12 / 1000 + 120)
    except subprocess.TimeoutExpired:
        alive = ready(spec["http"], f"/v2/models/{model}/ready")
        row["error"] = [f"perf_analyzer did not finish; the server {'still answers' if alive else 'does not answer'}"]
        return row
    if result.returncode != 0:
        row["error"] = (result.stdout + result.stderr).strip().splitlines()[-1:] or ["failed"]
        return row
    with report_path.open() as f:
        measured = next(csv.DictReader(f))
    report_path.unlink()
    row.update(throughput=float(measured["Inferences/Second"]), p50_ms=int(measured["p50 latency"]) / 1000,
               p99_ms=int(measured["p99 latency"]) / 1000)
    if cpu_before is not None and count_before is not None:
        cpu_after, count_after = tree_cpu_seconds(pid), served(server, model)
        if cpu_after is not None and count_after is not None and count_after > count_before:
            row["cpu_us_per_inference"] = (cpu_after - cpu_before) * 1e6 / (count_after - count_before)
    return row


def raw_onnxruntime(models, seconds):
    """The models' ceiling: onnxruntime in this process, one thread, no server, at batch 1 and 64."""
    rows = []
    rng = np.random.default_rng(0)
    for model in models:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(ROOT / "deploy" / "models" / model / "1" / "model.onnx"), options)
        for batch in (1, 64 if model != "minilm" else 32):
            feeds = {}
            for i in session.get_inputs():
                shape = [batch] + [SEQ_LEN if not isinstance(d, int) else d for d in i.shape[1:]]
                if i.name == "input_ids":
                    feeds[i.name] = rng.integers(1000, 2000, shape).astype(np.int64)
                elif i.name == "attention_mask":
                    feeds[i.name] = np.ones(shape, dtype=np.int64)
                elif i.name == "token_type_ids":
                    feeds[i.name] = np.zeros(shape, dtype=np.int64)
                else:
                    feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
            for _ in range(20):
                session.run(None, feeds)
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                session.run(None, feeds)
                calls += 1
            rows.append({"model": model, "batch": batch, "rows_per_s": calls * batch / (time.perf_counter() - start)})
    return rows


def reload_iforest(config):
    body = json.dumps({"parameters": {"config": json.dumps(config)}} if config else {}).encode()
    request = urllib.request.Request("http://127.0.0.1:8000/v2/repository/models/iforest/load", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=list(SERVERS))
    parser.add_argument("--models", nargs="+", default=["gbr", "iforest", "minilm"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--protocols", nargs="+", default=["grpc", "http"])
    parser.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer measurement window")
    parser.add_argument("--quick", action="store_true", help="1 s windows, concurrency 1 and 32 only")
    args = parser.parse_args()
    if args.quick:
        args.window_ms, args.concurrency = 1000, [1, 32]
    OUT.mkdir(parents=True, exist_ok=True)
    inputs = prepare(args.servers)
    machine = f"{os.cpu_count()} cores, {platform_name()}"
    results = {"machine": machine, "runs": [], "batching": [], "raw": []}
    for server in args.servers:
        process = start(server, args.models)
        try:
            for model in args.models:
                for protocol in args.protocols:
                    for c in args.concurrency:
                        row = perf(server, model, protocol, c, inputs, args.window_ms, process.pid)
                        print(format_row(row), flush=True)
                        results["runs"].append(row)
            if server == "marquee" and "iforest" in args.models:
                for label, config in (("off", IFOREST_UNBATCHED), ("on", None)):
                    reload_iforest(config)
                    row = perf(server, "iforest", "grpc", 64, inputs, args.window_ms)
                    row["batching"] = label
                    print(f"iforest batching {label}: " + format_row(row), flush=True)
                    results["batching"].append(row)
        finally:
            stop(process)
    results["raw"] = raw_onnxruntime(args.models, seconds=2)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    report(results, args)


def platform_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def format_row(row):
    if "error" in row:
        return f"{row['server']:<9}{row['model']:<8}{row['protocol']:<5}c={row['concurrency']:<3} FAILED {row['error']}"
    cpu = row.get("cpu_us_per_inference")
    return (f"{row['server']:<9}{row['model']:<8}{row['protocol']:<5}c={row['concurrency']:<3}"
            f"{row['throughput']:>10.0f} infer/s  p50 {row['p50_ms']:>7.2f} ms  p99 {row['p99_ms']:>7.2f} ms"
            f"  server CPU {f'{cpu:.1f} us' if cpu is not None else 'n/a'}/inference")


def report(results, args):
    runs = {(r["server"], r["model"], r["protocol"], r["concurrency"]): r for r in results["runs"] if "error" not in r}
    print(f"\nMachine: {results['machine']}\n")
    print("| model | protocol | concurrency | " + " | ".join(f"{s} infer/s (p50/p99 ms, server CPU-us/inference)" for s in args.servers)
          + " | " + " | ".join(f"marquee / {s}" for s in args.servers if s != "marquee") + " |")
    print("|" + "---|" * (3 + len(args.servers) + len([s for s in args.servers if s != "marquee"])))
    for model in args.models:
        for protocol in args.protocols:
            for c in args.concurrency:
                cells, ratios = [], []
                for s in args.servers:
                    r = runs.get((s, model, protocol, c))
                    cpu = r.get("cpu_us_per_inference") if r else None
                    cells.append(f"{r['throughput']:.0f} ({r['p50_ms']:.2f}/{r['p99_ms']:.2f}, "
                                 f"{f'{cpu:.0f}' if cpu is not None else 'n/a'} CPU-us)" if r else "failed")
                mine = runs.get(("marquee", model, protocol, c))
                for s in args.servers:
                    if s == "marquee":
                        continue
                    other = runs.get((s, model, protocol, c))
                    ratios.append(f"{mine['throughput'] / other['throughput']:.1f}x" if mine and other else "n/a")
                print(f"| {model} | {protocol} | {c} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    print("\nRaw onnxruntime in-process, 1 thread (the model's ceiling):")
    for r in results["raw"]:
        print(f"  {r['model']:<8} batch {r['batch']:<3} {r['rows_per_s']:>10.0f} rows/s")
    batching = {r["batching"]: r for r in results["batching"] if "error" not in r}
    if {"on", "off"} <= batching.keys():
        on, off = batching["on"]["throughput"], batching["off"]["throughput"]
        print(f"\niforest on Marquee, gRPC c=64: batching on {on:.0f} infer/s, off {off:.0f} infer/s: {on / off:.1f}x (target >= 4x)")
    for peer, target in (("triton", 10), ("mlserver", 15)):
        mine, other = runs.get(("marquee", "gbr", "grpc", 32)), runs.get((peer, "gbr", "grpc", 32))
        if mine and other:
            print(f"gbr gRPC c=32: marquee / {peer} = {mine['throughput'] / other['throughput']:.1f}x (target >= {target}x)")


if __name__ == "__main__":
    main()
