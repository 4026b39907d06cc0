#!/usr/bin/env bash
# Install ediff-train into ./.venv on a CPU machine (the README's commands call this).
#   bash tools/install.sh          # the package
#   bash tools/install.sh --dev    # plus the [dev] extra: test tools, DeepSpeed, submitit, ...
#   VENV=/path bash tools/install.sh   # another venv (made if missing)
# On a GPU machine with its own torch, use plain `pip install -e .` instead.
# Each pip step runs once, quietly; a failing step stops the script with pip's error and one
# line naming the step (PIP_VERBOSE=1 gives pip's normal output). The last lines are a summary.
set -euo pipefail
start=$SECONDS
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
case "${1:-}" in
  "") dev=0; extras="" ;;
  --dev) dev=1; extras="[dev]" ;;
  *) echo "usage: [VENV=dir] bash tools/install.sh [--dev]" >&2; exit 2 ;;
esac

fail() { echo "install.sh: FAILED: $*" >&2; exit 1; }

# pip_step NAME ARGS...: `pip install -q ARGS`, without the "Location '...' is ignored" warnings
# of this machine's local indexes; pip's other output (warnings, errors) goes through as it comes.
pip_step() {
  local name=$1 rc=0
  shift
  "$PY" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; } \
    || rc=$?
  [ "$rc" -eq 0 ] || fail "step '$name' (pip install $*) exited with $rc;" \
    "pip's error is above (PIP_VERBOSE=1 shows more)"
}

# check_import NAME MODULES: import them, showing the traceback when that fails.
check_import() {
  local name=$1 out
  out=$("$PY" -c "import $2" 2>&1) || { echo "$out" >&2; fail "step '$name': import $2"; }
}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || fail "step 'venv': python3 -m venv $VENV"
PY="$VENV/bin/python"
# The constraints keep pip on the CPU torch wheel: an unpinned torch (pulled by open_clip/timm
# through torchvision) would download several GB of CUDA packages.
export PIP_CONSTRAINT="$PWD/tools/constraints-cpu.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# torch and torchvision first (versions from the constraints), so that the shim below is in
# place before anything imports torchvision (open_clip does; so do the checks below).
pip_step torch torch torchvision

# A CUDA torchvision next to CPU torch cannot import (`operator torchvision::nms does not
# exist`); install the op-schema shim only where that happens (docs/design.md §7).
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ -f "$site/ediff_torchvision_shim.pth" ]; then
  cp tools/torchvision_shim.py "$site/ediff_torchvision_shim.py"   # keep it current
  shim="yes (already there; refreshed)"
elif "$PY" -c "import torchvision" >/dev/null 2>&1; then
  shim="no (torchvision imports without it)"
else
  cp tools/torchvision_shim.py "$site/ediff_torchvision_shim.py"
  echo "import ediff_torchvision_shim; ediff_torchvision_shim.install()" \
    > "$site/ediff_torchvision_shim.pth"
  shim="yes (installed now: torchvision cannot load its ops next to CPU torch)"
fi
check_import shim torchvision

# DeepSpeed (in [dev]) is built first, on its own: its setup.py imports torch, so build it
# against the torch already here (no isolated build env, which would build it without torch)
# and without compiling its CUDA ops (~15 s); `.[dev]` below then finds it installed.
if [ "$dev" = 1 ]; then
  pip_step build-tools setuptools wheel
  DS_BUILD_OPS=0 pip_step deepspeed --no-build-isolation "deepspeed>=0.14"
fi

# The package and its dependencies (and, with --dev, the whole [dev] extra of pyproject.toml).
pip_step "ediff-train$extras" -e ".$extras"
check_import imports \
  "ediff_train, lightning, hydra, webdataset, open_clip, transformers, torchvision, diffusers, peft"

deepspeed="-"
if [ "$dev" = 1 ]; then
  check_import deepspeed deepspeed
  deepspeed=$("$PY" -m pip show deepspeed 2>/dev/null | sed -n 's/^Version: //p')
fi
python=$("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')
torch=$("$PY" -c 'import torch, torchvision as tv; print(torch.__version__, tv.__version__)')

echo "ediff-train$extras installed in $VENV ($((SECONDS - start)) s)"
echo "  python:    $python"
echo "  torch:     ${torch% *} (torchvision ${torch#* })"
echo "  tv shim:   $shim"
[ "$dev" = 0 ] || echo "  deepspeed: $deepspeed"
