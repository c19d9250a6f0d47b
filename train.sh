#!/usr/bin/env bash
# The whole RLHF pipeline on the built-in task (or TASK=NAME, one of the suite), on whatever this machine has:
#   1. SFT on the noisy demonstrator            -> out/sft/ckpt.pt
#   2. K responses per prompt from the SFT model -> out/candidates.jsonl
#   3. the simulated raters rank them           -> out/rankings.jsonl
#   4. reward model on those rankings           -> out/reward/ckpt.pt
#   5. PPO (or GRPO, RLOO, REINFORCE++) against the reward model -> out/ppo/ckpt.pt (out/grpo/, ...)
#      and/or DPO on the same rankings          -> out/dpo/ckpt.pt
#   6. eval: each against SFT under the gold judge -> out/eval_ppo.json, out/eval_dpo.json, out/summary.json
#   7. pictures of every stage's curves           -> out/curves.png
#
#   ./train.sh               # the full run (about 6 minutes on 2 CPU cores)
#   QUICK=1 ./train.sh       # a tiny version, about a minute
#   NPROC=2 ./train.sh       # every training stage under torchrun --nproc_per_node=2
#   OUT=runs/a ./train.sh    # another output directory
#   SEED=1 ./train.sh        # another seed for every stage (sampling, rating and training)
#   METHOD=ppo ./train.sh    # PPO only; METHOD="grpo dpo" any of ppo, grpo, rloo, reinforce_pp and dpo (both: ppo dpo, the default)
#   OVERWRITE=1 ./train.sh   # start again in an OUT that already holds a run (without it, that is refused)
#   TASK=sort ./train.sh     # another task of the suite (data/tasks: sort, follow, facts, refuse; add is the built-in)
#   ARCH=llama ./train.sh    # the policy a new Llama-family model (RoPE, RMSNorm, SwiGLU, 2 key/value heads for 4) instead of GPT-2
#   ROUNDS=3 ./train.sh      # rounds 2 and 3 (in out/round2/, out/round3/): the latest policy answers the
#                            # next N_PREF train prompts, the raters rank them, the reward model is trained
#                            # again on every ranking so far, PPO and DPO continue, the reference stays SFT
# Creates or reuses .venv and installs the pinned requirements first.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh

OUT=${OUT:-out}
SEED=${SEED:-0}
NPROC=${NPROC:-1}
METHOD=${METHOD:-both}
ROUNDS=${ROUNDS:-1}
ARCH=${ARCH:-gpt2}
TASK=${TASK:-add}
SPEC=task  # what --data / --prompts call the task
[ "$TASK" = add ] || SPEC="task:$TASK"
[ "$METHOD" = both ] && METHOD="ppo dpo"
METHODS=(${METHOD//,/ })
for m in "${METHODS[@]}"; do
    case "$m" in ppo|grpo|rloo|reinforce_pp|dpo) ;;
        *) echo "train.sh: METHOD may name ppo, grpo, rloo, reinforce_pp and dpo, not '$m'" >&2; exit 1 ;; esac
done
case "$ARCH" in gpt2) ARCH_ARGS="" ;; llama) ARCH_ARGS="--arch llama --n_kv_head 2" ;;
    *) echo "train.sh: ARCH must be gpt2 or llama, not '$ARCH'" >&2; exit 1 ;; esac
if [ -e "$OUT/seconds.txt" ] && [ "${OVERWRITE:-0}" != 1 ]; then
    echo "train.sh: $OUT already holds a run; start again with OVERWRITE=1, or give another OUT" >&2
    exit 1
fi
if [ "${QUICK:-0}" = 1 ]; then
    SFT_ARGS="--max_steps 300 --n_demos 3000 --eval_every 150"
    N_PREF=400; K=4
    RM_ARGS="--batch_size 16 --epochs 2"
    RL_ARGS="--updates 15 --batch_size 32 --mini_batch_size 8"
    DPO_ARGS="--batch_size 16 --eval_every 25 --kl_prompts 32"
    N_EVAL=200
else
    SFT_ARGS=""
    N_PREF=2000; K=4
    RM_ARGS=""
    RL_ARGS=""
    DPO_ARGS=""
    N_EVAL=400
fi
RL=()  # the methods that need the reward model
for m in "${METHODS[@]}"; do [ "$m" = dpo ] || RL+=("$m"); done

run() {  # a training stage: plain python, or torchrun with NPROC processes
    if [ "$NPROC" -gt 1 ]; then
        OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} torchrun --standalone --nproc_per_node="$NPROC" "$@"
    else
        python "$@"
    fi
}
OW=(--overwrite true)  # a stage refuses to write over a run; train.sh checked above that OUT may be written
now() { date +%s.%N; }
timed() {  # timed NAME CMD...: run CMD and add its seconds to NAME's in $OUT/seconds.txt
    local name=$1 t
    t=$(now)
    shift
    "$@"
    echo "$name $(awk "BEGIN { print $(now) - $t }")" >> "$OUT/seconds.txt"
}
mkdir -p "$OUT"
: > "$OUT/seconds.txt"
SFT="$OUT/sft/ckpt.pt"

echo "== 1. SFT"
timed sft run sft.py --data "$SPEC" --out "$OUT/sft" --seed "$SEED" "${OW[@]}" $ARCH_ARGS $SFT_ARGS

one_round() {  # one_round R: rankings of the latest policy's samples, then each method, then eval
    local r=$1 dir="$OUT" all m
    [ "$r" -gt 1 ] && dir="$OUT/round$r"
    mkdir -p "$dir"
    echo "== round $r: 2-3. $K responses to each of $N_PREF train prompts from $SAMPLER, ranked by the simulated raters"
    timed samples python sample.py --init "$SAMPLER" --prompts "$SPEC" --split train --n "$N_PREF" \
        --offset $(( (r - 1) * N_PREF )) --k "$K" --seed "$SEED" --out "$dir/candidates.jsonl"
    timed samples python -m data.tasks rate --task "$TASK" --candidates "$dir/candidates.jsonl" --seed "$SEED" \
        --out "$dir/rankings.jsonl"
    ALL_RANKINGS+=("$dir/rankings.jsonl")
    all="$dir/rankings.jsonl"
    if [ "$r" -gt 1 ]; then  # the reward model learns from every ranking so far
        all="$dir/rankings_all.jsonl"
        cat "${ALL_RANKINGS[@]}" > "$all"
    fi
    local reward_args=()
    if [ ${#RL[@]} -gt 0 ]; then
        echo "== round $r: 4. reward model on $(wc -l < "$all") rankings"
        timed reward run reward.py --data "$all" --init "$SFT" --seed "$SEED" --out "$dir/reward" "${OW[@]}" $RM_ARGS
        reward_args=(--reward "$dir/reward/ckpt.pt")
    fi
    for m in "${METHODS[@]}"; do
        echo "== round $r: 5. ${m^^} from ${POLICY[$m]}"
        if [ "$m" = dpo ]; then
            timed dpo run dpo.py --data "$dir/rankings.jsonl" --init "${POLICY[$m]}" --ref "$SFT" --seed "$SEED" \
                --out "$dir/dpo" "${OW[@]}" $DPO_ARGS
        else
            timed "$m" run ppo.py --advantage "${m/#ppo/gae}" --data "$SPEC" --init "${POLICY[$m]}" --ref "$SFT" "${reward_args[@]}" --seed "$SEED" \
                --out "$dir/$m" "${OW[@]}" $RL_ARGS
        fi
        POLICY[$m]="$dir/$m/ckpt.pt"
    done
    SAMPLER=${POLICY[${METHODS[0]}]}  # the first method's policy writes the next round's candidates
    echo "== round $r: 6. eval on $N_EVAL held-out test prompts"
    for m in "${METHODS[@]}"; do  # the round's reward model scores DPO too, where there is one
        timed eval python eval.py --init "${POLICY[$m]}" --compare "$SFT" "${reward_args[@]}" --ref "$SFT" --n "$N_EVAL" \
            --prompts "$SPEC" --demos "$SPEC" \
            --out "$dir/eval_$m.json"
    done
}

SAMPLER=$SFT
declare -A POLICY
for m in "${METHODS[@]}"; do POLICY[$m]=$SFT; done
ALL_RANKINGS=()
for r in $(seq 1 "$ROUNDS"); do
    one_round "$r"
done

python plot.py "$OUT"  # every stage's curves (round 1's): $OUT/curves.png
python scripts/summary.py "$OUT" "$ROUNDS" "${METHODS[@]}"
