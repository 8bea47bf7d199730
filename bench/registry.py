"""The registry's own cost, measured against the floor and against MLflow, in one run:

* push and pull of a 200 MB ONNX artifact through `marquee registry` (checksums, manifest, refs)
  against a raw copy of the same file to the same store: `cp` for a local folder, boto3's managed
  transfer for an S3-compatible server (moto on loopback);
* start-up and answer time of `marquee registry list` against `mlflow experiments search`
  (MLflow's CLI, sqlite backend), each a fresh process, as a script would run them.

    .marquee/venv/bin/python bench/registry.py [--size-mb 200] [--repeats 5] [--cli-repeats 20]

Needs `deploy/setup.sh --test` (moto, boto3, onnx) and `bench/peers/setup.sh .marquee/peers`
(MLflow); the script runs both and builds Marquee before it measures. Prints medians and the
ratios the project tracks, and writes them to .marquee/bench/registry.json.
"""

import argparse
import json
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request

import boto3
import numpy as np
import onnx
from onnx import TensorProto, helper

import suite_build
from loopback import free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOME = ROOT / ".marquee"
MARQUEE = ROOT / "target" / "release" / "marquee"
MLFLOW = HOME / "peers" / "venv-mlflow" / "bin" / "mlflow"
MOTO = HOME / "venv" / "bin" / "moto_server"
OUT = HOME / "bench"
BUCKET = "bench"
S3_OPTIONS = {
    "aws_allow_http": "true",
    "aws_region": "us-east-1",
    "aws_access_key_id": "bench",
    "aws_secret_access_key": "bench",
}


def run(command, **kwargs):
    subprocess.run(command, check=True, cwd=ROOT, **kwargs)


def prepare():
    run([str(ROOT / "deploy" / "setup.sh"), "--test"])
    run([str(ROOT / "bench" / "peers" / "setup.sh"), str(HOME / "peers")])
    suite_build.build()


def make_artifact(path, size_mb):
    """An embedding model (Gather over a table) whose table makes it `size_mb` MB."""
    width = 64
    rows = size_mb * 1024 * 1024 // (4 * width)
    table = np.random.default_rng(7).standard_normal((rows, width), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["embedding"])],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor("table", TensorProto.FLOAT, table.shape, table.tobytes(), raw=True)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path.stat().st_size


def timed(action):
    """Wall time of `action`, started with no dirty pages left by the previous one, so the
    kernel's writeback does not bill one side for the other's writes."""
    os.sync()
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# CPU seconds the marquee processes used, per operation (push or pull), over all rounds.
MARQUEE_CPU = {}


def marquee(registry, *args, options=None):
    command = [str(MARQUEE), "registry", "--registry", registry, "--by", "bench"]
    for key, value in (options or {}).items():
        command += ["--registry-option", f"{key}={value}"]
    before = children_cpu()
    subprocess.run(command + list(args), check=True, stdout=subprocess.DEVNULL)
    MARQUEE_CPU.setdefault(args[0], []).append(children_cpu() - before)


def local_round(artifact, work, repeats):
    registry = str(work / "registry")
    pushes, copies, pulls, raw_pulls = [], [], [], []
    for i in range(1, repeats + 1):
        raw = work / "raw" / str(i)
        raw.mkdir(parents=True)
        copies.append(timed(lambda: run(["cp", str(artifact), str(raw / "model.onnx")])))
        pushes.append(timed(lambda: marquee(registry, "push", "embedding", str(artifact))))
        back = work / "back" / str(i)
        back.mkdir(parents=True)
        raw_pulls.append(
            timed(lambda: run(["cp", str(raw / "model.onnx"), str(back / "raw.onnx")]))
        )
        pulls.append(timed(lambda: marquee(registry, "pull", "embedding", str(i), str(back))))
        shutil.rmtree(work / "back")
        shutil.rmtree(raw)
    return {"push": pushes, "raw_push": copies, "pull": pulls, "raw_pull": raw_pulls}


def start_moto():
    port = free_port()
    process = subprocess.Popen(
        [str(MOTO), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT"))
            return process, endpoint
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("moto_server did not start")


def s3_round(artifact, work, repeats):
    process, endpoint = start_moto()
    try:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=S3_OPTIONS["aws_region"],
            aws_access_key_id=S3_OPTIONS["aws_access_key_id"],
            aws_secret_access_key=S3_OPTIONS["aws_secret_access_key"],
        )
        options = dict(S3_OPTIONS, aws_endpoint=endpoint)
        registry = f"s3://{BUCKET}/registry"
        pushes, uploads, pulls, downloads = [], [], [], []
        for i in range(1, repeats + 1):
            key = f"raw/{i}/model.onnx"
            uploads.append(timed(lambda: client.upload_file(str(artifact), BUCKET, key)))
            pushes.append(
                timed(lambda: marquee(registry, "push", "embedding", str(artifact), options=options))
            )
            back = work / "back"
            back.mkdir()
            downloads.append(
                timed(lambda: client.download_file(BUCKET, key, str(back / "raw.onnx")))
            )
            pulls.append(
                timed(lambda: marquee(registry, "pull", "embedding", str(i), str(back), options=options))
            )
            shutil.rmtree(back)
            # moto keeps objects in memory: drop this round's bytes before the next one.
            client.delete_object(Bucket=BUCKET, Key=key)
            client.delete_object(Bucket=BUCKET, Key=f"registry/embedding/{i}/model.onnx")
        return {"push": pushes, "raw_push": uploads, "pull": pulls, "raw_pull": downloads}
    finally:
        process.kill()
        process.wait()


def cli_round(work, repeats):
    registry = str(work / "cli-registry")
    small = work / "small.onnx"
    make_artifact(small, 1)
    for name in ("recommendation", "pricing", "fraud", "embedding"):
        marquee(registry, "push", name, str(small))
    environment = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")
    mlflow = [str(MLFLOW), "experiments", "search"]
    for name in ("recommendation", "pricing", "fraud", "embedding"):
        subprocess.run(
            [str(MLFLOW), "experiments", "create", "--experiment-name", name],
            check=True,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    marquee_list = [str(MARQUEE), "registry", "--registry", registry, "list"]
    for command, env in ((marquee_list, None), (mlflow, environment)):
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(timed(lambda: subprocess.run(marquee_list, check=True, stdout=subprocess.DEVNULL)))
        theirs.append(
            timed(
                lambda: subprocess.run(
                    mlflow, check=True, env=environment, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        )
    return {"marquee_list": ours, "mlflow_list": theirs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cli-repeats", type=int, default=20)
    parser.add_argument("--skip-prepare", action="store_true")
    args = parser.parse_args()
    if not args.skip_prepare:
        prepare()
    suite_build.use_libtorch()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=HOME) as tmp:
        work = pathlib.Path(tmp)
        artifact = work / "model.onnx"
        size = make_artifact(artifact, args.size_mb)
        results = {"artifact_bytes": size}
        for store, measure in (("local", local_round), ("s3", s3_round)):
            MARQUEE_CPU.clear()
            results[store] = measure(artifact, work, args.repeats)
            results[store].update({f"cpu_{op}": cpu for op, cpu in MARQUEE_CPU.items()})
        results["cli"] = cli_round(work, args.cli_repeats)
    mb = size / 1e6
    print(f"\nartifact: {mb:.0f} MB, {args.repeats} rounds; medians\n")
    print(
        f"{'store':6} {'op':5} {'marquee MB/s':>13} {'raw MB/s':>9} {'marquee/raw':>12}"
        f" {'marquee CPU s':>14}"
    )
    summary = {}
    for store in ("local", "s3"):
        for op in ("push", "pull"):
            ours = statistics.median(results[store][op])
            raw = statistics.median(results[store][f"raw_{op}"])
            summary[f"{store}_{op}_over_raw_throughput"] = raw / ours
            cpu = statistics.median(results[store][f"cpu_{op}"])
            print(
                f"{store:6} {op:5} {mb / ours:13.0f} {mb / raw:9.0f} {raw / ours:12.2f}"
                f" {cpu:14.2f}"
            )
    ours = statistics.median(results["cli"]["marquee_list"])
    theirs = statistics.median(results["cli"]["mlflow_list"])
    summary["mlflow_list_over_marquee_list"] = theirs / ours
    print(
        f"\nlist, fresh process ({args.cli_repeats} runs): marquee {ours * 1e3:.1f} ms, "
        f"mlflow {theirs * 1e3:.0f} ms: marquee {theirs / ours:.0f}x faster"
    )
    results["summary"] = summary
    (OUT / "registry.json").write_text(json.dumps(results, indent=2))
    print(f"\nall timings: {OUT / 'registry.json'}")


if __name__ == "__main__":
    main()
