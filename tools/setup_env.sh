#!/usr/bin/env bash
# Creates .venv at the repository root and installs everything lesa_mm needs,
# from the package registries only. Safe to re-run: finished steps are skipped.
#
#   bash tools/setup_env.sh
#
# The one slow step is building mmcv 2.1.0 with its compiled ops (no wheel exists
# for torch 2.13): about 10-12 minutes on 2 cores. The built wheel is cached
# outside the repository (LESA_MM_WHEEL_CACHE, default ~/.cache/lesa_mm/wheels),
# keyed by the mmcv, torch and Python versions, so later set-ups take seconds.
set -euo pipefail

TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
MMCV_VERSION=2.1.0
MMENGINE_VERSION=0.10.7
MMDET_VERSION=3.3.0
MMPRETRAIN_VERSION=1.2.0

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
python_bin=${PYTHON:-python3}

log() { printf '[setup_env] %s\n' "$*"; }

if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($python_bin --version 2>&1)"
  "$python_bin" -m venv .venv
fi
py=.venv/bin/python
pip() { "$py" -m pip "$@"; }

pip install -q --upgrade pip
# mmcv's build imports pkg_resources, which setuptools 81 removed.
pip install -q "setuptools>=77,<81" wheel ninja

# '===' asks for exactly this version string, so the machine's local
# '+cpu' torch file (which has no matching torchvision) is never chosen.
log "installing torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION"
pip install -q "torch===$TORCH_VERSION" "torchvision===$TORCHVISION_VERSION" "numpy<2"

py_tag=$("$py" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')
cache_root=${LESA_MM_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lesa_mm/wheels}
cache_dir="$cache_root/mmcv-${MMCV_VERSION}_torch-${TORCH_VERSION}_${py_tag}"
mkdir -p "$cache_dir"
mmcv_wheel=$(ls "$cache_dir"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$mmcv_wheel" ]; then
  log "building mmcv $MMCV_VERSION with ops from source (about 10-12 minutes on 2 cores)"
  tmp_dir=$(mktemp -d)
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} FORCE_CUDA=0 \
    "$py" -m pip wheel -q --no-deps --no-build-isolation --no-binary mmcv \
    "mmcv==$MMCV_VERSION" -w "$tmp_dir"
  mv "$tmp_dir"/mmcv-"$MMCV_VERSION"-*.whl "$cache_dir"/
  rm -rf "$tmp_dir"
  mmcv_wheel=$(ls "$cache_dir"/mmcv-"$MMCV_VERSION"-*.whl | head -n 1)
else
  log "using cached mmcv wheel $mmcv_wheel"
fi

log "installing mmcv, mmengine, mmdet, mmpretrain and test tools"
pip install -q "$mmcv_wheel" \
  "mmengine==$MMENGINE_VERSION" "mmdet==$MMDET_VERSION" "mmpretrain==$MMPRETRAIN_VERSION" \
  "torch===$TORCH_VERSION" "torchvision===$TORCHVISION_VERSION" \
  "numpy<2" "opencv-python<4.12" pycocotools pytest
# lesa_mm itself with its `deploy` (onnx, onnxruntime, onnxscript) and
# `tests` extras. Its install_requires are ranges that the packages above
# satisfy, so pip keeps them; torch, torchvision, numpy and opencv are
# restated so that no extra's dependency can replace them.
log "installing lesa_mm with the deploy and tests extras"
pip install -q --no-build-isolation -e ".[deploy,tests]" \
  "torch===$TORCH_VERSION" "torchvision===$TORCHVISION_VERSION" \
  "numpy<2" "opencv-python<4.12"
# OpenMIM (`mim list`, `mim train lesa_mm CONFIG`, `mim test ...`) without
# its dataset-download dependencies (opendatalab/openxlab would downgrade
# setuptools, requests, rich and numpy): the package with --no-deps and what
# its train/test/list commands import.
log "installing openmim"
pip install -q --no-deps "openmim==0.3.9"
pip install -q tabulate colorama requests "pandas<3" "numpy<2"
# MMDeploy 1.3.1 for the detector's deployment (configs/deploy/): its wheel
# pins protobuf<=3.20.2, which would downgrade protobuf and onnx, so the
# package with --no-deps and the dependencies its ONNX Runtime path imports.
log "installing mmdeploy"
pip install -q --no-deps "mmdeploy==1.3.1"
pip install -q aenum multiprocess prettytable dill wcwidth "numpy<2"
# MMEngine resolves `with read_base(): from lesa_mm.configs... import *` by
# looking for site-packages/lesa_mm, which a PEP 660 editable install does
# not create: point it at the repository's package.
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -e "$site/lesa_mm" ]; then
  ln -s "$repo/lesa_mm" "$site/lesa_mm"
fi

"$py" - <<'PY'
import mmcv, mmdet, mmengine, mmpretrain, torch, torchvision
import onnx, onnxruntime, onnxscript
from mmcv.ops import DeformConv2d  # noqa: F401  (fails if the ops were not compiled)
import lesa_mm
print(f'[setup_env] ready: torch {torch.__version__}, torchvision {torchvision.__version__}, '
      f'mmcv {mmcv.__version__} (ops), mmengine {mmengine.__version__}, mmdet {mmdet.__version__}, '
      f'mmpretrain {mmpretrain.__version__}, lesa_mm {lesa_mm.__version__}, '
      f'onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, '
      f'onnxscript {onnxscript.__version__}')
PY
