#!/usr/bin/env bash
# The whole test suite (the README's test command; .ci/run calls exactly this):
#   1. set-up with test tools and libtorch (idempotent, fast when already done)
#   2. fixtures: test models (ONNX and TorchScript) and the reference answers of Python
#      onnxruntime and torch
#   3. Rust: unit, property and end-to-end tests (one release build, with the torch backend,
#      serves tests and the binary), and a check that the `cuda` feature compiles
#   4. Python: tritonclient conformance (TorchScript models included) and perf_analyzer against
#      the real `marquee serve`
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "set-up"
deploy/setup.sh --test --torch
# libtorch for the torch backend: where torch-sys builds against it, where the binaries find it.
set -a
. .marquee/torch.env
set +a
export LD_LIBRARY_PATH="$MARQUEE_TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MARQUEE_TEST_TORCH=1
TORCH=(--features marquee-tests/torch)
step "fixtures"
.marquee/venv/bin/python tests/fixtures/make_fixtures.py
step "build"
cargo build --release --workspace --all-targets "${TORCH[@]}"
# What the build leaves on disk (a CI run once ran out of it while linking; README, Quick start).
echo "target/: $(du -sh target 2>/dev/null | cut -f1); free: $(df -h --output=avail . | tail -1)"
step "the CUDA build compiles (ONNX Runtime's CUDA provider, loaded at run time)"
cargo check --release -p marquee-serving --features cuda
step "Rust tests"
cargo test --release --workspace --all-targets "${TORCH[@]}"
step "tritonclient and perf_analyzer against marquee serve"
.marquee/venv/bin/python -m pytest tests/python -q
step "all tests passed"
