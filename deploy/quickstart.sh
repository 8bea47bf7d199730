#!/usr/bin/env bash
# Sets everything up and serves the example repository in the foreground: KServe v2 REST on 8000,
# gRPC on 8001, Prometheus metrics on 8002, /v1/predict with the in-process feature store (the
# README's first command). Extra arguments go to `marquee serve`, e.g.
# `deploy/quickstart.sh --http-port 9000`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
deploy/setup.sh
cargo build --release -p marquee-cli --bin marquee
exec "${CARGO_TARGET_DIR:-target}/release/marquee" serve --model-repository deploy/models --features deploy/features.toml "$@"
