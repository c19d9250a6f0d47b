#!/usr/bin/env bash
# Every GPU measurement of this repo in one command, in under 8 minutes on one GPU:
#
#   benchmarks/gpu_check.sh [--out DIR] [--hh FILE]
#
#   1. python benchmarks/ppo_step.py --updates 5   one PPO update by phase, ours against Hugging Face's
#   2. python -m kernels.bench                     the kernels against eager and compiled PyTorch
#   3. pytest tests/test_kernels.py tests/test_model.py tests/test_no_triton.py, on CUDA
#   4. with an HH-RLHF file (--hh FILE, or $HH_RLHF): sft.py, reward.py, ppo.py at GPT-2 124M shape
#      on it (the GPT-2 tokenizer from $MINRLHF_GPT2_BPE, else shared/tokenizers/r50k_base.tiktoken),
#      each with its peak GPU memory; the tests of step 3 run beside them, so the stages' seconds
#      are not clean figures, their peak memory is (each process counts its own).
#
# Each step runs under its own `timeout`, cut further so that all of them end within the budget
# ($GPU_CHECK_BUDGET seconds, default 480); its output streams to DIR/<step>.txt (DIR: --out, else
# $OUT, else benchmarks/gpu_check_out) and to the console. A step that fails or times out does not
# stop the next ones. DIR/summary.txt starts with one line (date, GPUs, torch and triton versions,
# commit), then each step's start, exit status and seconds, then the peak memory lines. Triton
# compiles into a fresh cache, so the first PPO update pays what a fresh machine pays. On a
# machine without a CUDA GPU it says so and exits 0.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/gpu_check_out}
HH=${HH_RLHF:-}
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUT_DIR=$2; shift 2 ;;
    --hh) HH=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (it takes --out DIR and --hh FILE)"; exit 2 ;;
  esac
done
PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET:-480}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check.sh: found no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to measure."
  exit 0
fi

mkdir -p "$OUT_DIR"
SUMMARY=$OUT_DIR/summary.txt
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the kernels on the GPU, not in the interpreter
export TRITON_CACHE_DIR=$(mktemp -d)  # a fresh compile cache (see above)
WORK=$(mktemp -d)  # the stages' checkpoints
T0=$(date +%s)

commit=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no git)")}
git diff --quiet HEAD 2>/dev/null || commit="$commit (and uncommitted changes)"
gpus=$(nvidia-smi -L 2>/dev/null | paste -sd ';' -)
echo "$(date -u '+%Y-%m-%d %H:%M UTC') | ${gpus:-nvidia-smi -L printed nothing}" \
  "| $("$PY" -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}")' 2>&1)" \
  "| commit $commit | MINRLHF_AUTOTUNE=${MINRLHF_AUTOTUNE:-unset}" | tee "$SUMMARY"

log() { echo "== $(( $(date +%s) - T0 ))s $*" | tee -a "$SUMMARY"; }

# step NAME LIMIT COMMAND...: COMMAND under `timeout`, at most LIMIT seconds and never past the
# budget, its output to DIR/NAME.txt and the console
step() {
  local name=$1 limit=$2 start rc
  shift 2
  local left=$(( BUDGET - 10 - ($(date +%s) - T0) ))
  if [ "$left" -lt 10 ]; then log "$name skipped: the budget of ${BUDGET}s is spent"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "$name (limit ${limit}s): $*"
  start=$(date +%s)
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt"
  rc=${PIPESTATUS[0]}
  log "$name rc=$rc$( [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo ' (timed out)') after $(( $(date +%s) - start ))s"
}

step ppo_step 135 "$PY" benchmarks/ppo_step.py --updates 5
step kernels_bench 135 "$PY" -m kernels.bench
# the tests check the default launch configs, so MINRLHF_AUTOTUNE (for the benchmark) is not theirs
TESTS=(env -u MINRLHF_AUTOTUNE "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_model.py
       tests/test_no_triton.py)
if [ -z "$HH" ]; then
  log "stages skipped: no HH-RLHF file (--hh FILE or \$HH_RLHF)"
  step tests 165 "${TESTS[@]}"
else
  if [ -z "${MINRLHF_GPT2_BPE:-}" ]; then
    for f in shared/tokenizers/r50k_base.tiktoken ../shared/tokenizers/r50k_base.tiktoken; do
      [ -f "$f" ] && export MINRLHF_GPT2_BPE=$PWD/$f && break
    done
  fi
  step tests 165 "${TESTS[@]}" > /dev/null &  # its output still goes to DIR/tests.txt
  TESTS_PID=$!
  step sft 50 "$PY" sft.py --tokenizer gpt2 --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 \
    --data "$HH" --max_steps 20 --batch_size 32 --lr 3e-4 --warmup_steps 5 --eval_every 10 --out "$WORK/sft"
  step reward 55 "$PY" reward.py --init "$WORK/sft/ckpt.pt" --data "$HH" --epochs 1 --batch_size 32 \
    --eval_every 20 --normalize_prompts 64 --out "$WORK/reward"
  step ppo 55 "$PY" ppo.py --init "$WORK/sft/ckpt.pt" --reward "$WORK/reward/ckpt.pt" --data "$HH" --updates 6 \
    --batch_size 64 --mini_batch_size 16 --max_new_tokens 128 --lr 1e-6 --kl_coef 0.05 --eval_every 0 \
    --out "$WORK/ppo"
  cp "$WORK/ppo/metrics.jsonl" "$OUT_DIR/ppo_metrics.jsonl" 2>/dev/null
  wait "$TESTS_PID"
  tail -n 3 "$OUT_DIR/tests.txt" 2>/dev/null
  for name in sft reward ppo; do
    grep -h "peak GPU memory" "$OUT_DIR/$name.txt" 2>/dev/null | sed "s/^/$name: /" | tee -a "$SUMMARY"
  done
fi
log "done; outputs in $OUT_DIR"
exit 0
