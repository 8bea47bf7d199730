#!/usr/bin/env bash
# The whole test suite (the README's test command; .ci/run calls exactly this):
#   1. set-up with test tools (idempotent, fast when already done)
#   2. fixtures: test models and Python onnxruntime reference answers
#   3. Rust: unit, property and end-to-end tests (one release build serves tests and the binary),
#      and a check that the `cuda` feature compiles
#   4. Python: tritonclient conformance and perf_analyzer against the real `marquee serve`
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "set-up"
deploy/setup.sh --test
step "fixtures"
.marquee/venv/bin/python tests/fixtures/make_fixtures.py
step "build"
cargo build --release --workspace --all-targets
step "the CUDA build compiles (ONNX Runtime's CUDA provider, loaded at run time)"
cargo check --release -p marquee-serving --features cuda
step "Rust tests"
cargo test --release --workspace --all-targets
step "tritonclient and perf_analyzer against marquee serve"
.marquee/venv/bin/python -m pytest tests/python -q
step "all tests passed"
