#!/usr/bin/env bash
# The whole RLHF pipeline on the built-in task, on whatever this machine has:
#   1. SFT on the noisy demonstrator            -> out/sft/ckpt.pt
#   2. K responses per prompt from the SFT model -> out/candidates.jsonl
#   3. the simulated raters rank them           -> out/rankings.jsonl
#   4. reward model on those rankings           -> out/reward/ckpt.pt
#   5. PPO against the reward model             -> out/ppo/ckpt.pt
#      and/or DPO on the same rankings          -> out/dpo/ckpt.pt
#   6. eval: each against SFT under the gold judge -> out/eval.json, out/eval_dpo.json, out/summary.json
#   7. pictures of every stage's curves           -> out/curves.png
#
#   ./train.sh               # the full run (about 5 minutes on 2 CPU cores)
#   QUICK=1 ./train.sh       # a tiny version, about a minute
#   NPROC=2 ./train.sh       # every training stage under torchrun --nproc_per_node=2
#   OUT=runs/a ./train.sh    # another output directory
#   SEED=1 ./train.sh        # another seed for every stage (sampling, rating and training)
#   METHOD=ppo ./train.sh    # PPO only (dpo: DPO only, without a reward model; both: the default)
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
case "$METHOD" in ppo|dpo|both) ;; *) echo "METHOD must be ppo, dpo or both, not '$METHOD'" >&2; exit 1 ;; esac
if [ "${QUICK:-0}" = 1 ]; then
    SFT_ARGS="--max_steps 300 --n_demos 3000 --eval_every 150"
    N_PREF=400; K=4
    RM_ARGS="--batch_size 16 --epochs 2"
    PPO_ARGS="--updates 15 --batch_size 32 --mini_batch_size 8"
    DPO_ARGS="--batch_size 16 --eval_every 25 --kl_prompts 32"
    N_EVAL=200
else
    SFT_ARGS=""
    N_PREF=2000; K=4
    RM_ARGS=""
    PPO_ARGS=""
    DPO_ARGS=""
    N_EVAL=400
fi
has() { [ "$METHOD" = both ] || [ "$METHOD" = "$1" ]; }

run() {  # a training stage: plain python, or torchrun with NPROC processes
    if [ "$NPROC" -gt 1 ]; then
        OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} torchrun --standalone --nproc_per_node="$NPROC" "$@"
    else
        python "$@"
    fi
}
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
timed sft run sft.py --out "$OUT/sft" --seed "$SEED" $SFT_ARGS

one_round() {  # one_round R: rankings of the latest policy's samples, then PPO and/or DPO, then eval
    local r=$1 dir="$OUT" all
    [ "$r" -gt 1 ] && dir="$OUT/round$r"
    mkdir -p "$dir"
    echo "== round $r: 2-3. $K responses to each of $N_PREF train prompts from $SAMPLER, ranked by the simulated raters"
    timed samples python sample.py --init "$SAMPLER" --prompts task --split train --n "$N_PREF" \
        --offset $(( (r - 1) * N_PREF )) --k "$K" --seed "$SEED" --out "$dir/candidates.jsonl"
    timed samples python -m data.task rate --candidates "$dir/candidates.jsonl" --seed "$SEED" --out "$dir/rankings.jsonl"
    ALL_RANKINGS+=("$dir/rankings.jsonl")
    all="$dir/rankings.jsonl"
    if [ "$r" -gt 1 ]; then  # the reward model learns from every ranking so far
        all="$dir/rankings_all.jsonl"
        cat "${ALL_RANKINGS[@]}" > "$all"
    fi
    local reward_args=()
    if has ppo; then
        echo "== round $r: 4. reward model on $(wc -l < "$all") rankings"
        timed reward run reward.py --data "$all" --init "$SFT" --seed "$SEED" --out "$dir/reward" $RM_ARGS
        reward_args=(--reward "$dir/reward/ckpt.pt")
        echo "== round $r: 5. PPO from $PPO_POLICY"
        timed ppo run ppo.py --init "$PPO_POLICY" --ref "$SFT" --reward "$dir/reward/ckpt.pt" --seed "$SEED" --out "$dir/ppo" $PPO_ARGS
        PPO_POLICY="$dir/ppo/ckpt.pt"
        SAMPLER=$PPO_POLICY
    fi
    if has dpo; then
        echo "== round $r: 5. DPO from $DPO_POLICY"
        timed dpo run dpo.py --data "$dir/rankings.jsonl" --init "$DPO_POLICY" --ref "$SFT" --seed "$SEED" --out "$dir/dpo" $DPO_ARGS
        DPO_POLICY="$dir/dpo/ckpt.pt"
        has ppo || SAMPLER=$DPO_POLICY
    fi
    echo "== round $r: 6. eval on $N_EVAL held-out test prompts"
    if has ppo; then
        timed eval python eval.py --init "$PPO_POLICY" --compare "$SFT" "${reward_args[@]}" --ref "$SFT" --n "$N_EVAL" --out "$dir/eval.json"
    fi
    if has dpo; then  # the round's reward model scores DPO too, where there is one
        timed eval python eval.py --init "$DPO_POLICY" --compare "$SFT" "${reward_args[@]}" --ref "$SFT" --n "$N_EVAL" --out "$dir/eval_dpo.json"
    fi
}

SAMPLER=$SFT PPO_POLICY=$SFT DPO_POLICY=$SFT
ALL_RANKINGS=()
for r in $(seq 1 "$ROUNDS"); do
    one_round "$r"
done

python plot.py "$OUT"  # every stage's curves (round 1's): $OUT/curves.png

python - "$OUT" "$ROUNDS" <<'EOF'
import json, os, sys
from collections import defaultdict
import torch
out, rounds = sys.argv[1], int(sys.argv[2])
seconds = defaultdict(float)
for line in open(f"{out}/seconds.txt"):
    name, s = line.split()
    seconds[name] += float(s)
seconds["total"] = sum(seconds.values())

def result(path, sft):
    """A policy's entry from its eval file (None when that method did not run)."""
    if not os.path.exists(path):
        return None, sft
    ev = json.load(open(path))
    (policy, m), (_, sft) = ev["models"].items()
    return {"gold": m["gold"], "rm_score": m.get("rm_score"), "kl": m["kl"], "win_rate_vs_sft": ev["win_rate"],
            "perplexity": m["perplexity"], "examples": ev["examples"], "prompts": ev["prompts"]}, sft

rows, sft = [], None
for r in range(1, rounds + 1):
    d = out if r == 1 else f"{out}/round{r}"
    ppo, sft = result(f"{d}/eval.json", sft)
    dpo, sft = result(f"{d}/eval_dpo.json", sft)
    rows.append({"round": r, **{k: v for k, v in (("ppo", ppo), ("dpo", dpo)) if v is not None}})
examples = next(x["examples"] for x in (rows[-1].get("ppo"), rows[-1].get("dpo")) if x)
n_eval = next(x["prompts"] for x in (rows[-1].get("ppo"), rows[-1].get("dpo")) if x)
for row in rows:
    for k in ("ppo", "dpo"):
        if k in row:
            row[k] = {n: v for n, v in row[k].items() if n not in ("examples", "prompts")}
sft_ckpt = torch.load(f"{out}/sft/ckpt.pt", map_location="cpu", weights_only=True)
summary = {"sft": {"gold": sft["gold"], "val_loss": sft_ckpt["val_loss"], "perplexity": sft["perplexity"]}}
if os.path.exists(f"{out}/reward/ckpt.pt"):
    rm_ckpt = torch.load(f"{out}/reward/ckpt.pt", map_location="cpu", weights_only=True)
    summary["reward"] = {"val_accuracy": rm_ckpt["val/gold_accuracy"],  # against the gold ordering
                         "val_accuracy_raters": rm_ckpt["val/accuracy"]}  # against the raters' rankings
summary.update({k: rows[-1][k] for k in ("ppo", "dpo") if k in rows[-1]})  # the last round's policies
summary.update({"rounds": rows, "eval_prompts": n_eval, "seconds": dict(seconds)})
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)

def num(v, width):
    return f"{v:>{width}.3f}" if v is not None else f"{'-':>{width}}"

print(f"\n{'':<10}{'gold':>8}{'rm_score':>10}{'kl':>8}{'ppl':>8}{'win vs SFT':>12}")
print(f"{'SFT':<10}{num(sft['gold'], 8)}{num(sft.get('rm_score'), 10)}{num(sft['kl'], 8)}{num(sft['perplexity'], 8)}")
for k in ("dpo", "ppo"):
    if k in summary:
        m = summary[k]
        print(f"{k.upper():<10}{num(m['gold'], 8)}{num(m['rm_score'], 10)}{num(m['kl'], 8)}{num(m['perplexity'], 8)}"
              f"{m['win_rate_vs_sft']:>12.1%}")
if rounds > 1:
    print("\nround by round: gold score (win rate against SFT)")
    for row in rows:
        print(f"  round {row['round']}: " + " | ".join(f"{k.upper()} {row[k]['gold']:.3f} ({row[k]['win_rate_vs_sft']:.1%})"
                                                   for k in ("dpo", "ppo") if k in row))
for k in ("dpo", "ppo"):
    if k in summary:
        print(f"{k.upper()} wins {summary[k]['win_rate_vs_sft']:.1%} of {n_eval} test prompts against SFT under the gold judge (ties half)")
if "reward" in summary:
    print(f"reward model: {summary['reward']['val_accuracy']:.1%} of held-out pairs ordered as gold orders them")
print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
name = "PPO" if "ppo" in summary else "DPO"
print(f"\nsome test prompts, {name} of the last round against SFT (gold score in brackets):")
for ex in examples:
    print("-" * 80 + "\n" + ex["prompt"].split("\n")[0])
    print(f"  SFT [{ex['gold'][1]:+.1f}]:{ex['responses'][1]}")
    print(f"  {name} [{ex['gold'][0]:+.1f}]:{ex['responses'][0]}")
print(f"\nwrote {out}/summary.json")
EOF
