#!/usr/bin/env bash
# One-shot GPU check (issue #36): every step of the GPU plan in one call of ~9 minutes, all
# figures in one JSON and one log. docs/performance.md#gpu-check-benchgpu_checksh.
#
#   bash bench/gpu_check.sh --out "$OUT"      # on a machine with one H100/H200
#   bash bench/gpu_check.sh --dry-run         # every step's CPU path, tiny sizes (~1-2 min)
#
# Options:
#   --out DIR       where gpu_check.json, gpu_check.log and gpu_check_junit.xml go
#                   (default: $OUT if set, else gpu_check_out/)
#   --dry-run       CPU (GPUs hidden), tiny configs, two steps at a time; CUDA-only parts
#                   "skipped (no CUDA)", tests/test_gpu.py skipped
#   --budget S      seconds for the whole run (default 540; dry run: none, each step its cap)
#   --only A,B      run only these steps (the others are recorded as skipped)
#   --jobs N        steps at a time (default 1 on the GPU: timings must not overlap; dry run 2)
# Environment: PYTHON (default .venv/bin/python if there, else python3); GPU_CHECK_MAX_STEP_S
# caps every step's timeout (to try the timeout path).
#
# Steps (plan step: name): 1 env; 2 pytest_gpu; 3 train_base64_sweep, train_base64_channels_last,
# train_base64_no_ckpt, train_mmdit_sd3; 4 sample_base64; 5 train_sr, degrade;
# 6 train_base64_compile (dynamo's counters). Each runs under its own `timeout`; a step that
# fails or times out is recorded (status, exit status, the tail of its output) and the next one
# runs. The benches run first, tests/test_gpu.py last with the rest of the budget (at least
# PYTEST_RESERVE seconds), so a slow test run cannot starve the figures. The JSON is rewritten
# after every step: a run killed from outside still leaves the finished steps. Exit status 0
# when every step that ran finished ok or skipped, 1 otherwise.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT:-gpu_check_out}
DRY=0
BUDGET=540
ONLY=""
JOBS=""
PYTEST_RESERVE=240 # seconds kept for tests/test_gpu.py (GPU run)
GRACE=15           # after a step's timeout (SIGINT), SIGKILL this much later
MIN_STEP=20        # a step with less time than this left is skipped (budget)

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUT_DIR=${2:?--out needs a folder}; shift 2 ;;
    --out=*) OUT_DIR=${1#*=}; shift ;;
    --dry-run) DRY=1; shift ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
    --only) ONLY=${2:?--only needs step names}; shift 2 ;;
    --jobs) JOBS=${2:?--jobs needs a number}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (--help)" >&2; exit 2 ;;
  esac
done
[ -n "$JOBS" ] || JOBS=$((DRY ? 2 : 1))

mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
JSON=$OUT_DIR/gpu_check.json
LOG=$OUT_DIR/gpu_check.log
JUNIT=$OUT_DIR/gpu_check_junit.xml
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
rm -f "$JSON" "$JUNIT"
: >"$LOG"
cd "$ROOT" || exit 2

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY=$ROOT/.venv/bin/python
else
  PY=python3
fi
# this checkout's package, whether or not it is installed (the GPU image has no install of it)
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
export WANDB_SILENT=true
MERGE=$ROOT/bench/gpu_check_merge.py
TS=$ROOT/bench/train_step.py

log() { echo "$*" | tee -a "$LOG"; }
q() { printf '%q ' "$@"; } # a command line, quoted for bash -c

[ "$DRY" = 1 ] && export CUDA_VISIBLE_DEVICES="" # the CPU path, even on a GPU machine
CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>>"$LOG" | tail -1)
[ "$CUDA" = 1 ] || CUDA=0
if [ "$DRY" = 1 ]; then
  export OMP_NUM_THREADS=1 # tiny nets: one thread each beats two fighting on a small CPU
  DEV=(--device cpu --threads 1)
else
  DEV=(--device cuda)
fi

# --- the plan: name, plan step, kind, timeout cap (s), title, CUDA-only parts, command --------
NAMES=() PLANS=() KINDS=() CAPS=() TITLES=() PARTS=() CMDS=() FIGS=()
add() {
  NAMES+=("$1") PLANS+=("$2") KINDS+=("$3") CAPS+=("$4") TITLES+=("$5") PARTS+=("$6")
  CMDS+=("$7") FIGS+=("$8")
}
W=$WORK
if [ "$DRY" = 1 ]; then
  BASE=(--configs tiny) SWEEP=(--batch 2,4) ONE=(--batch 2) NOCKPT=(--batch 2)
  STEPS=(--steps 1 --warmup 0) BACKEND=(--backend eager)
  MMDIT=(--configs mmdit_tiny --batch 2 --steps 1 --warmup 0)
  SAMPLE=(--config tiny --experts 3 --batch 1 --steps 2 --repeats 1 --lora 2)
  SR=(--configs sr_tiny sr1024_tiny --batch 2 --steps 1 --warmup 0 --infer 32)
  DEGRADE=(--devices cpu --threads 1 --batch 2 --size 64 --out-size 16 --batches 1 --warmup 0)
else
  BASE=(--configs base64) SWEEP=(--batch 64,128,256,512) ONE=(--batch 128) NOCKPT=(--batch 128)
  STEPS=(--steps 4 --warmup 1) BACKEND=(--backend inductor)
  MMDIT=(--configs "$W/mmdit_sd3_lat64.yaml" --t5-len 113 --batch 16 --steps 3 --warmup 1)
  SAMPLE=(--config base64 --experts 3 --batch 16 --steps 8 --repeats 2 --lora 8)
  SR=(--configs sr256 sr1024 --batch 16,32 --steps 3 --warmup 1 --infer 1024)
  DEGRADE=(--devices cuda --batch 64 --batches 20 --warmup 2)
fi
GPU_FIG="MFU;peak memory (torch.cuda.max_memory_allocated);fused AdamW"
add env 1 env 30 "environment: nvidia-smi, torch, CUDA device, capability, memory" \
  "nvidia-smi;CUDA device name, capability, memory" \
  "$(q "$PY" "$MERGE" env --out "$W/env.json")" "$W/env.json"
add pytest_gpu 2 pytest 300 "pytest tests/test_gpu.py on the GPU" "" \
  "$(q "$PY" -m pytest tests/test_gpu.py -n 0 -p no:cacheprovider -rA --durations=0 \
    --junitxml="$JUNIT")" "$JUNIT"
add train_base64_sweep 3 train 90 "train step, base64 batch sweep (eager, AdamW)" "$GPU_FIG" \
  "$(q "$PY" "$TS" "${DEV[@]}" "${BASE[@]}" "${SWEEP[@]}" "${STEPS[@]}" --optim \
    --json "$W/train_base64_sweep.json")" "$W/train_base64_sweep.json"
add train_base64_channels_last 3 train 45 "train step, base64 channels-last" "$GPU_FIG" \
  "$(q "$PY" "$TS" "${DEV[@]}" "${BASE[@]}" "${ONE[@]}" "${STEPS[@]}" --optim --channels-last \
    --json "$W/train_base64_channels_last.json")" "$W/train_base64_channels_last.json"
add train_base64_no_ckpt 3 train 45 "train step, base64 without grad checkpointing" "$GPU_FIG" \
  "$(q "$PY" "$TS" "${DEV[@]}" "${BASE[@]}" "${NOCKPT[@]}" "${STEPS[@]}" --optim \
    --no-checkpointing --json "$W/train_base64_no_ckpt.json")" "$W/train_base64_no_ckpt.json"
add train_mmdit_sd3 3 train 80 "train step, SD3-medium MMDiT (24 blocks, 64² latents)" \
  "$GPU_FIG;the 2B-parameter mmdit_sd3 (dry run: mmdit_tiny)" \
  "$(q "$PY" "$TS" "${DEV[@]}" "${MMDIT[@]}" --optim --json "$W/train_mmdit_sd3.json")" \
  "$W/train_mmdit_sd3.json"
add sample_base64 4 sample 90 "sampler: 3-expert ensemble vs one model, offload, LoRA" \
  "peak memory with and without offload (CUDA max allocated);CUDA-stream prefetch" \
  "$(q "$PY" bench/sample.py "${DEV[@]}" "${SAMPLE[@]}" --offload --json "$W/sample_base64.json")" \
  "$W/sample_base64.json"
add train_sr 5 sr 70 "SR256/SR1024 train step (bf16), SR1024 inference at 1024²" \
  "$GPU_FIG;sr256/sr1024 at full size (dry run: sr_tiny, sr1024_tiny)" \
  "$(q "$PY" "$TS" "${DEV[@]}" "${SR[@]}" --dtype bf16 --optim --json "$W/train_sr.json")" \
  "$W/train_sr.json"
add degrade 5 degrade 40 "Real-ESRGAN degradation chain, samples/s" "the CUDA row" \
  "$(q "$PY" bench/degrade.py "${DEGRADE[@]}" --out "$W/degrade.json")" "$W/degrade.json"
add train_base64_compile 6 compile 120 "train step, base64 under torch.compile + dynamo counters" \
  "$GPU_FIG;the inductor backend (dry run: eager, dynamo alone)" \
  "$(q "$PY" "$TS" "${DEV[@]}" "${BASE[@]}" "${ONE[@]}" "${STEPS[@]}" --optim --compile on \
    "${BACKEND[@]}" --json "$W/train_base64_compile.json")" "$W/train_base64_compile.json"

# execution order: GPU: the benches by priority, then the tests with what is left of the budget;
# dry run: the longest first, so two at a time finish together
if [ "$DRY" = 1 ]; then
  ORDER=(sample_base64 train_base64_compile train_sr train_mmdit_sd3 train_base64_sweep
    train_base64_channels_last train_base64_no_ckpt pytest_gpu degrade env)
else
  ORDER=(env train_base64_sweep train_base64_compile sample_base64 train_sr degrade
    train_base64_no_ckpt train_base64_channels_last train_mmdit_sd3 pytest_gpu)
fi
index_of() { local i; for i in "${!NAMES[@]}"; do [ "${NAMES[$i]}" = "$1" ] && echo "$i"; done; }
if [ -n "$ONLY" ]; then
  for n in ${ONLY//,/ }; do
    [ -n "$(index_of "$n")" ] || { echo "gpu_check.sh: no step $n (${NAMES[*]})" >&2; exit 2; }
  done
fi

init=("$PY" "$MERGE" init --json "$JSON" --steps "${NAMES[@]}" --budget "$BUDGET" --log "$LOG")
[ "$DRY" = 1 ] && init+=(--dry-run)
[ "$CUDA" = 1 ] && init+=(--cuda)
"${init[@]}" || { echo "gpu_check.sh: cannot write $JSON" >&2; exit 2; }
log "gpu_check.sh: $([ "$DRY" = 1 ] && echo "dry run (CPU, tiny sizes)" || echo "GPU run")," \
  "CUDA $([ "$CUDA" = 1 ] && echo yes || echo no), python $PY, budget ${BUDGET}s," \
  "out $OUT_DIR, started $(date -u +%FT%TZ)"

# record I [RC SECONDS TIMEOUT | "" "" "" STATUS REASON]
record() {
  local i=$1 rc=${2:-} secs=${3:-} tmo=${4:-} status=${5:-skipped} reason=${6:-}
  local args=(--json "$JSON" --step "${NAMES[$i]}" --plan "${PLANS[$i]}" --kind "${KINDS[$i]}"
    --title "${TITLES[$i]}" --cmd "${CMDS[$i]}" --cuda-parts "${PARTS[$i]}"
    --figures "${FIGS[$i]}" --output "$W/${NAMES[$i]}.out")
  if [ -n "$rc" ]; then
    args+=(--rc "$rc" --seconds "$secs" --timeout "$tmo")
  else
    args+=(--status "$status" --reason "$reason")
  fi
  "$PY" "$MERGE" record "${args[@]}" >>"$LOG" 2>&1 || log "  (could not record ${NAMES[$i]})"
}

# run_one I TIMEOUT: the step under `timeout`; its output, exit status and seconds into $W
run_one() {
  local i=$1 t=$2 name=${NAMES[$1]} start=$SECONDS rc
  timeout -s INT -k "$GRACE" "$t" bash -c "${CMDS[$i]}" >"$W/$name.out" 2>&1 </dev/null
  rc=$?
  echo "$rc" >"$W/$name.rc"
  echo $((SECONDS - start)) >"$W/$name.secs"
}

# finish_one I: the step's output into the log, its record into the JSON, a line on stdout
finish_one() {
  local i=$1 name=${NAMES[$1]}
  local rc secs
  rc=$(cat "$W/$name.rc") secs=$(cat "$W/$name.secs")
  {
    echo "=== step ${PLANS[$i]} $name: ${TITLES[$i]}"
    echo "\$ ${CMDS[$i]}"
    cat "$W/$name.out"
    echo "=== $name: exit $rc after ${secs}s (timeout $(cat "$W/$name.t")s)"
  } >>"$LOG"
  record "$i" "$rc" "$secs" "$(cat "$W/$name.t")"
  echo "[$name] exit $rc after ${secs}s: $("$PY" "$MERGE" status --json "$JSON" --step "$name")" |
    tee -a "$LOG"
}

skip() { # skip I REASON
  log "[${NAMES[$1]}] skipped ($2)"
  record "$1" "" "" "" skipped "$2"
}

PENDING=()
for name in "${ORDER[@]}"; do
  i=$(index_of "$name")
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
    skip "$i" "not selected (--only)"
    continue
  fi
  if [ "$DRY" = 0 ] && [ "$CUDA" = 0 ] && [ "$name" != env ]; then
    skip "$i" "no CUDA (--dry-run runs the CPU path)"
    continue
  fi
  t=${CAPS[$i]}
  [ -n "${GPU_CHECK_MAX_STEP_S:-}" ] && [ "$GPU_CHECK_MAX_STEP_S" -lt "$t" ] && t=$GPU_CHECK_MAX_STEP_S
  if [ "$DRY" = 0 ]; then # the budget: the benches leave PYTEST_RESERVE to the tests
    left=$((BUDGET - SECONDS - GRACE))
    [ "$name" = pytest_gpu ] || left=$((left - PYTEST_RESERVE))
    [ "$left" -lt "$t" ] && t=$left
    if [ "$t" -lt "$MIN_STEP" ]; then
      skip "$i" "time budget: ${left}s left of ${BUDGET}s"
      continue
    fi
  fi
  echo "$t" >"$W/$name.t"
  if [ "$name" = train_mmdit_sd3 ] && [ "$DRY" = 0 ]; then
    "$PY" "$MERGE" mmdit-yaml "$W/mmdit_sd3_lat64.yaml" --size 64 >>"$LOG" 2>&1
  fi
  log "[$name] step ${PLANS[$i]}: ${TITLES[$i]} (timeout ${t}s)"
  if [ "$JOBS" -le 1 ]; then
    run_one "$i" "$t"
    finish_one "$i"
  else
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    run_one "$i" "$t" &
    PENDING+=("$i")
  fi
done
wait
for i in "${PENDING[@]}"; do finish_one "$i"; done

"$PY" "$MERGE" finish --json "$JSON" --wall "$SECONDS"
log ""
"$PY" "$MERGE" summary --json "$JSON" | tee -a "$LOG"
log "wrote $JSON, $LOG$([ -f "$JUNIT" ] && echo ", $JUNIT") in ${SECONDS}s"
"$PY" -c 'import json,sys
steps = json.load(open(sys.argv[1]))["steps"].values()
sys.exit(any(r["status"] in ("failed", "timeout", "pending") for r in steps))' "$JSON"
