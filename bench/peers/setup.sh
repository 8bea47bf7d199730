#!/usr/bin/env bash
# Installs the peers the benchmarks put beside Marquee: Triton (through PyTriton, which bundles
# tritonserver) and Seldon's MLServer for bench/compare.py, MLflow's CLI for bench/registry.py, and
# Feast (whose pyarrow bench/predict.py also uses to write Parquet) for bench/features.py. Each gets its own virtual environment in DIR, because their
# pins clash: PyTriton 0.7.0 needs numpy<2, and MLServer 1.7.1 needs uvloop 0.21.0 (0.22 and later
# kill its inference workers). Both run the models through onnxruntime, the same version Marquee
# loads. Running it again skips any environment whose package list has not changed.
#
#   bench/peers/setup.sh DIR        e.g. bench/peers/setup.sh .marquee/peers
set -euo pipefail
DIR=${1:?usage: setup.sh DIR}
PYTHON=${PYTHON:-python3}
ORT=onnxruntime==1.31.1
mkdir -p "$DIR"

# make_venv NAME PACKAGE...: creates DIR/NAME with the packages; a stamp file named after the package
# list marks it done.
make_venv() {
  local venv="$DIR/$1"
  shift
  local stamp
  stamp="$venv/.installed-$(printf '%s\n' "$@" | sha256sum | cut -c1-16)"
  [ -f "$stamp" ] && return
  echo "[peers] $venv: $*"
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "$@"
  rm -f "$venv"/.installed-*
  touch "$stamp"
}

make_venv venv-triton "nvidia-pytriton==0.7.0" "numpy<2" "$ORT"
make_venv venv-mlserver "mlserver==1.7.1" "uvloop==0.21.0" "$ORT"
make_venv venv-mlflow "mlflow==3.17.2"
make_venv venv-feast "feast[redis]==0.67.0"
echo "[peers] ready in $DIR"
