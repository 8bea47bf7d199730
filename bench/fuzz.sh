#!/usr/bin/env bash
# Runs every cargo fuzz target of the server (serving/fuzz) for a bounded time each, seeded with
# the repository's own examples (configurations, pipelines, requests), and stops at the first
# crash: libFuzzer then leaves the input under serving/fuzz/artifacts/<target>/, which becomes a
# regression test. Never run by the test suite (it needs nightly and minutes per target).
#
#   bench/fuzz.sh [seconds per target, default 60] [target ...]
#
# Installs cargo-fuzz into .marquee/cargo (once) and builds with the nightly toolchain.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SECONDS_PER_TARGET=${1:-60}
shift || true
TOOLS="$ROOT/.marquee/cargo"
export PATH="$TOOLS/bin:$PATH"
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
if ! command -v cargo-fuzz >/dev/null; then
  cargo install --locked --root "$TOOLS" cargo-fuzz
fi
cd serving/fuzz
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  mapfile -t TARGETS < <(cargo +nightly fuzz list)
  [ ${#TARGETS[@]} -gt 0 ] || { echo "cargo fuzz list found no targets" >&2; exit 1; }
fi

# Seeds: what the repository itself holds of each input kind.
seed() {
  local target=$1
  local corpus="corpus/$target"
  mkdir -p "$corpus"
  case "$target" in
    config_pbtxt) for f in "$ROOT"/deploy/models/*/config.pbtxt; do cp "$f" "$corpus/$(basename "$(dirname "$f")").pbtxt"; done ;;
    pipeline_json) for f in "$ROOT"/deploy/models/*/pipeline.json; do cp "$f" "$corpus/$(basename "$(dirname "$f")").json"; done ;;
    rest_infer_body)
      printf '\0\0{"inputs":[{"name":"X","shape":[1,2],"datatype":"FP32","data":[1.0,2.0]}],"outputs":[{"name":"Y","parameters":{"binary_data":true}}]}' >"$corpus/json"
      header='{"inputs":[{"name":"X","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}'
      { printf "\\x00\\x$(printf %02x ${#header})"; printf '%s' "$header"; printf '\0\0\x80\x3f\0\0\0\x40'; } >"$corpus/binary" ;;
    json_tensor)
      printf '\x0b\x02\x04\x04[[1.0,2.0],[3.0,4.0]]' >"$corpus/fp32"
      printf '\x0d\x01\x04["a","bc"]' >"$corpus/bytes" ;;
    *) ;;
  esac
}

for target in "${TARGETS[@]}"; do
  seed "$target"
  printf '\n\033[1m== %s (%ss)\033[0m\n' "$target" "$SECONDS_PER_TARGET"
  cargo +nightly fuzz run "$target" "corpus/$target" -- -max_total_time="$SECONDS_PER_TARGET" -max_len=4096
done
printf '\nall fuzz targets ran %ss each without a crash\n' "$SECONDS_PER_TARGET"
