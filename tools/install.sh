#!/usr/bin/env bash
# Install ediff-train into ./.venv on a CPU machine (the README's commands call this).
#   bash tools/install.sh          # the package
#   bash tools/install.sh --dev    # plus test tools, DeepSpeed and the submitit launcher
# On a GPU machine with its own torch, use plain `pip install -e .` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
# The constraints keep pip on the CPU torch wheel: an unpinned torch (pulled by open_clip/timm
# through torchvision) would download several GB of CUDA packages.
export PIP_CONSTRAINT="$PWD/tools/constraints-cpu.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
# DeepSpeed (in [dev]) is built first, on its own: its setup.py imports torch, so build it
# against the torch already here (no isolated build env, which would build it without torch)
# and without compiling its CUDA ops (~15 s); `.[dev]` below then finds it installed.
if [ "${1:-}" = "--dev" ]; then
  "$PY" -m pip install -q setuptools wheel
  DS_BUILD_OPS=0 "$PY" -m pip install -q --no-build-isolation "deepspeed>=0.14" 2>&1 \
    | grep -v "is ignored" || true
fi
"$PY" -m pip install -q -e ".$extras" 2>&1 | grep -v "is ignored" || true
"$PY" -c "import ediff_train, lightning, hydra, webdataset, open_clip, transformers" >/dev/null 2>&1 \
  || { "$PY" -m pip install -e ".$extras"; }

# A CUDA torchvision next to CPU torch cannot import (`operator torchvision::nms does not
# exist`); install the op-schema shim only where that happens (DESIGN §7).
if ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
  site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cp tools/torchvision_shim.py "$site/ediff_torchvision_shim.py"
  echo "import ediff_torchvision_shim; ediff_torchvision_shim.install()" \
    > "$site/ediff_torchvision_shim.pth"
  "$PY" -c "import torchvision, open_clip, lightning" >/dev/null
  echo "installed the torchvision op-schema shim into $site"
fi

if [ "${1:-}" = "--dev" ]; then
  "$PY" -c "import deepspeed" >/dev/null 2>&1 || { echo "DeepSpeed failed to install" >&2; exit 1; }
fi

echo "ediff-train installed in $VENV"
