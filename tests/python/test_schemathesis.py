"""Schemathesis (property-based requests generated from the server's own OpenAPI document,
/v1/openapi.json) against the quick start's server: valid and invalid requests alike, no answer
may be a 5xx. A fixed seed keeps the run reproducible; a failure prints the request to replay."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_no_generated_request_gets_a_server_error(example_server):
    schemathesis = pathlib.Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [str(schemathesis), "run", f"http://{example_server.http}/v1/openapi.json",
         "--checks", "not_a_server_error", "--mode", "all", "--max-examples", "300",
         "--seed", "20261202", "--workers", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT / ".marquee", env={**os.environ, "NO_COLOR": "1"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Schemathesis exits 0 also when it could test nothing: make sure it sent requests.
    sent = re.search(r"(\d+) generated", output)
    assert sent and int(sent.group(1)) > 50, output
