"""Starts the real `marquee serve` (release build) on free loopback ports over the fixture
repository, once per test session, and hands its addresses to the tests."""

import os
import pathlib
import socket
import subprocess
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / ".marquee" / "fixtures"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, http, grpc, metrics):
        self.http, self.grpc, self.metrics = http, grpc, metrics


def served_repository(tmp):
    """The fixture repository as linked into `tmp`: the TorchScript models (torch_*) only with
    MARQUEE_TEST_TORCH=1, as a server built without the torch backend refuses them, and a server
    that refused a model never reports ready (strict readiness)."""
    if os.environ.get("MARQUEE_TEST_TORCH") == "1":
        return FIXTURES / "models"
    for model in (FIXTURES / "models").iterdir():
        if not model.name.startswith("torch_"):
            (tmp / model.name).symlink_to(model)
    return tmp


def serve(args, log_name):
    """Starts `marquee serve` with `args` on free loopback ports; yields its addresses once it is
    ready, and checks that it shuts down cleanly on SIGTERM."""
    binary = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "marquee"
    assert binary.exists(), "build first: cargo build --release -p marquee-cli"
    ports = [free_port() for _ in range(3)]
    log = open(ROOT / ".marquee" / log_name, "w")
    process = subprocess.Popen(
        [str(binary), "serve", *args, "--host", "127.0.0.1",
         "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MARQUEE_LOG": "warn"},
    )
    deadline = time.time() + 120
    while True:
        assert process.poll() is None, f"marquee serve exited; see {log.name}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert time.time() < deadline, "marquee serve did not become ready"
        time.sleep(0.2)
    yield Server(f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}", f"127.0.0.1:{ports[2]}")
    process.terminate()
    assert process.wait(timeout=30) == 0, "marquee serve should shut down cleanly on SIGTERM"
    log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    assert (FIXTURES / "models").is_dir(), "fixtures missing: run tests/fixtures/make_fixtures.py"
    repository = served_repository(tmp_path_factory.mktemp("models"))
    yield from serve(["--model-repository", str(repository)], "pytest-server.log")


@pytest.fixture(scope="session")
def example_server():
    """The example repository's server (deploy/models, with /v1/predict pipelines) and its
    feature definitions, on the in-process online store."""
    assert (ROOT / "deploy/models/gbr/1").is_dir(), "example models missing: run deploy/setup.sh"
    yield from serve(["--model-repository", str(ROOT / "deploy/models"),
                      "--features", str(ROOT / "deploy/features.toml")], "pytest-example-server.log")
