"""Builds what a benchmark runs exactly as the test suite (tests/run.sh) builds it: the whole
workspace, all targets, with the torch backend when `deploy/setup.sh --torch` has installed
libtorch. A benchmark run after the suite rebuilds nothing, and the suite run after a benchmark
rebuilds nothing: building one binary with other features would rebuild a hundred crates (cargo
unifies features per build) and replace the binary the suite's Python tests start.

    import suite_build
    suite_build.build()          # before the benchmark measures; binaries it starts find libtorch
"""

import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH_ENV = ROOT / ".marquee" / "torch.env"


def torch_env():
    """The variables torch-sys builds with and the torch build's binaries load libtorch by
    (`.marquee/torch.env`, KEY=VALUE lines); empty when libtorch is not installed."""
    if not TORCH_ENV.exists():
        return {}
    pairs = (line.split("=", 1) for line in TORCH_ENV.read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def use_libtorch():
    """Puts libtorch's variables and library folder into this process's environment, so cargo
    builds torch-sys against it and every binary started from here (inheriting the environment)
    loads it: a torch build does not start without it. Nothing when libtorch is not installed."""
    torch = torch_env()
    if not torch:
        return
    os.environ.update(torch)
    library = torch["MARQUEE_TORCH_LIB"]
    if library not in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        os.environ["LD_LIBRARY_PATH"] = library + (":" + os.environ["LD_LIBRARY_PATH"] if os.environ.get("LD_LIBRARY_PATH") else "")


def build():
    """`cargo build --release --workspace --all-targets`, with the torch feature when libtorch is
    installed (`use_libtorch` first, which a benchmark that skips building calls itself)."""
    use_libtorch()
    features = ["--features", "marquee-tests/torch"] if torch_env() else []
    subprocess.run(["cargo", "build", "--release", "--workspace", "--all-targets", *features], check=True, cwd=ROOT)
