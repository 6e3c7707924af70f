#!/usr/bin/env bash
# Creates .venv/ in the repository root with the stack of shared/ENVIRONMENT.md and installs tokenzoo into it
# (editable, with the mm, export, cls and dev extras).
#
# mmcv 2.1.0 has no wheel for torch 2.14, so it is built once from its sdist (C++20, CPU ops only) and the wheel is
# cached outside the checkout, keyed by the torch version it was built against, so fresh clones and CI reuse it.
# A second run with unchanged set-up files does nothing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
CONSTRAINTS="$ROOT/tools/setup/constraints.txt"
TORCH_VERSION=$(sed -n 's/^torch==//p' "$CONSTRAINTS")
MMCV_VERSION=$(sed -n 's/^mmcv==//p' "$CONSTRAINTS")
WHEEL_DIR="${TOKENZOO_CACHE:-$HOME/.cache/tokenzoo}/wheels/torch-$TORCH_VERSION"
STAMP="$VENV/.tokenzoo-setup"
SETUP_HASH=$(cat "$ROOT/setup.py" "$CONSTRAINTS" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)

STEP="start"
step() { STEP="$1"; echo "[setup $(date +%T)] $1"; }
trap 'echo "[setup] FAILED during: $STEP (exit $?)" >&2' ERR

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$SETUP_HASH" ]]; then
  echo "[setup] .venv is up to date"
  exit 0
fi

command -v python3.11 >/dev/null || { echo "[setup] python3.11 is required (found: $(command -v python3 || echo none))" >&2; exit 1; }

step "create .venv (python3.11)"
[[ -x "$PY" ]] || python3.11 -m venv "$VENV"
# Drops the machine-wide extra-index warnings about absent local folders; pip's own exit status still decides (pipefail).
drop_index_warnings() { grep -v "is ignored: it is neither a file nor a directory" || true; }
pip_q() { "$PY" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | drop_index_warnings; }
pip_q --upgrade pip
pip_q -c "$CONSTRAINTS" setuptools wheel ninja

step "install torch $TORCH_VERSION + torchvision (CUDA build, runs on CPU; ~6 GB the first time)"
pip_q -c "$CONSTRAINTS" torch torchvision

build_mmcv() {
  local work
  work=$(mktemp -d)
  step "build mmcv $MMCV_VERSION wheel for torch $TORCH_VERSION (once; 12-17 min on 2 cores)"
  "$PY" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation -d "$work" "mmcv==$MMCV_VERSION" 2>&1 \
    | drop_index_warnings
  tar -xzf "$work"/mmcv-"$MMCV_VERSION".tar.gz -C "$work"
  local src="$work/mmcv-$MMCV_VERSION"
  # torch 2.14's headers need C++20; mmcv's setup.py hard-codes older standards.
  sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$src/setup.py"
  local total
  total=$(find "$src/mmcv/ops/csrc/pytorch" -name '*.cpp' -not -path '*/cuda/*' -not -path '*/npu/*' \
          -not -path '*/mlu/*' -not -path '*/mps/*' | wc -l)
  ( cd "$src" && env -u FORCE_CUDA MAX_JOBS=2 MMCV_WITH_OPS=1 \
      "$PY" -m pip wheel --no-build-isolation --no-deps -w "$work/dist" . >"$work/build.log" 2>&1 ) &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 60
    echo "[setup $(date +%T)]   mmcv: $(find "$src" -name '*.o' | wc -l)/$total objects compiled"
  done
  if ! wait "$pid"; then
    tail -40 "$work/build.log" >&2
    echo "[setup] mmcv build failed; full log: $work/build.log" >&2
    return 1
  fi
  mkdir -p "$WHEEL_DIR"
  cp "$work"/dist/mmcv-*.whl "$WHEEL_DIR"/
  rm -rf "$work"
}
if ! ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl >/dev/null 2>&1; then
  build_mmcv
else
  step "reuse cached mmcv wheel from $WHEEL_DIR"
fi

step "install tokenzoo (editable) with the mm, export, cls and dev extras"
pip_q -c "$CONSTRAINTS" --find-links "$WHEEL_DIR" -e "$ROOT[mm,export,cls,dev]"

step "check the stack imports"
"$PY" - <<'PY'
import mmcv.ops, mmdet, mmseg, onnxruntime, onnxslim, timm, torch, torchvision  # noqa: F401
import matplotlib, skimage.data, sklearn.datasets  # noqa: F401
import tokenzoo  # noqa: F401
print(f"[setup] torch {torch.__version__}, timm {timm.__version__}, mmcv {mmcv.__version__}, "
      f"onnxruntime {onnxruntime.__version__}")
PY
echo "$SETUP_HASH" >"$STAMP"
step "done"
