"""perf_analyzer (PyPI perf-analyzer 2.60.0, Triton's own load generator) completes short runs
against `marquee serve` over HTTP (binary tensors) and gRPC. Success, not speed, is asserted here;
speed lives in bench/."""

import csv
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PERF_ANALYZER = ROOT / ".marquee" / "perf" / "bin" / "perf_analyzer"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_completes(server, protocol, tmp_path):
    url = server.http if protocol == "http" else server.grpc
    report = tmp_path / f"{protocol}.csv"
    command = [str(PERF_ANALYZER), "-m", "gbr", "-u", url, "-i", protocol, "-b", "1", "--shape", "X:10",
               "--concurrency-range", "4", "-p", "1000", "-s", "1000", "-r", "3", "-f", str(report)]
    if protocol == "http":
        command += ["--input-tensor-format", "binary", "--output-tensor-format", "binary"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Server:" in run.stdout, "perf_analyzer read the server-side statistics"
    rows = list(csv.DictReader(report.open()))
    assert float(rows[0]["Inferences/Second"]) > 0
