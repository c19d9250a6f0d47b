#!/usr/bin/env bash
# The whole RLHF pipeline on the built-in task, on whatever this machine has:
#   1. SFT on the noisy demonstrator            -> out/sft/ckpt.pt
#   2. K responses per prompt from the SFT model -> out/candidates.jsonl
#   3. the simulated raters rank them           -> out/rankings.jsonl
#   4. reward model on those rankings           -> out/reward/ckpt.pt
#   5. PPO against the reward model             -> out/ppo/ckpt.pt
#   6. eval: PPO against SFT under the gold judge -> out/eval.json, out/summary.json
#
#   ./train.sh               # the full run (about 10 minutes on 2 CPU cores)
#   QUICK=1 ./train.sh       # a tiny version, under 2 minutes
#   NPROC=2 ./train.sh       # every training stage under torchrun --nproc_per_node=2
#   OUT=runs/a ./train.sh    # another output directory
# Creates or reuses .venv and installs the pinned requirements first.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh

OUT=${OUT:-out}
NPROC=${NPROC:-1}
if [ "${QUICK:-0}" = 1 ]; then
    SFT_ARGS="--max_steps 300 --n_demos 3000 --eval_every 150"
    N_PREF=400; K=4
    RM_ARGS="--batch_size 16 --epochs 2"
    PPO_ARGS="--updates 15 --batch_size 32 --mini_batch_size 8"
    N_EVAL=200
else
    SFT_ARGS=""
    N_PREF=2000; K=4
    RM_ARGS=""
    PPO_ARGS=""
    N_EVAL=400
fi

run() {  # a training stage: plain python, or torchrun with NPROC processes
    if [ "$NPROC" -gt 1 ]; then
        OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} torchrun --standalone --nproc_per_node="$NPROC" "$@"
    else
        python "$@"
    fi
}
now() { date +%s.%N; }
mkdir -p "$OUT"
t0=$(now)

echo "== 1. SFT"
run sft.py --out "$OUT/sft" $SFT_ARGS
t1=$(now)

echo "== 2-3. $K responses to each of $N_PREF prompts from the SFT model, ranked by the simulated raters"
python sample.py --init "$OUT/sft/ckpt.pt" --prompts task --split train --n "$N_PREF" --k "$K" --out "$OUT/candidates.jsonl"
python -m data.task rate --candidates "$OUT/candidates.jsonl" --out "$OUT/rankings.jsonl"
echo "== 4. reward model"
run reward.py --data "$OUT/rankings.jsonl" --init "$OUT/sft/ckpt.pt" --out "$OUT/reward" $RM_ARGS
t2=$(now)

echo "== 5. PPO"
run ppo.py --init "$OUT/sft/ckpt.pt" --reward "$OUT/reward/ckpt.pt" --out "$OUT/ppo" $PPO_ARGS
t3=$(now)

echo "== 6. eval on $N_EVAL held-out test prompts"
python eval.py --init "$OUT/ppo/ckpt.pt" --compare "$OUT/sft/ckpt.pt" --reward "$OUT/reward/ckpt.pt" \
    --ref "$OUT/sft/ckpt.pt" --n "$N_EVAL" --out "$OUT/eval.json"
t4=$(now)

python - "$OUT" "$t0" "$t1" "$t2" "$t3" "$t4" <<'EOF'
import json, sys
import torch
out, t0, t1, t2, t3, t4 = sys.argv[1], *map(float, sys.argv[2:])
ev = json.load(open(f"{out}/eval.json"))
sft, ppo = ev["models"][f"{out}/sft/ckpt.pt"], ev["models"][f"{out}/ppo/ckpt.pt"]
sft_ckpt = torch.load(f"{out}/sft/ckpt.pt", map_location="cpu", weights_only=True)
rm_ckpt = torch.load(f"{out}/reward/ckpt.pt", map_location="cpu", weights_only=True)
summary = {
    "sft": {"gold": sft["gold"], "val_loss": sft_ckpt["val_loss"], "perplexity": sft["perplexity"]},
    "reward": {"val_accuracy": rm_ckpt["val/gold_accuracy"],  # against the gold ordering
               "val_accuracy_raters": rm_ckpt["val/accuracy"]},  # against the raters' rankings
    "ppo": {"gold": ppo["gold"], "rm_score": ppo["rm_score"], "kl": ppo["kl"],
            "win_rate_vs_sft": ev["win_rate"], "perplexity": ppo["perplexity"]},
    "eval_prompts": ev["prompts"],
    "seconds": {"sft": t1 - t0, "reward": t2 - t1, "ppo": t3 - t2, "eval": t4 - t3, "total": t4 - t0},
}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(f"\n{'':<10}{'gold':>8}{'rm_score':>10}{'kl':>8}{'ppl':>8}")
print(f"{'SFT':<10}{sft['gold']:>8.3f}{sft['rm_score']:>10.3f}{sft['kl']:>8.3f}{sft['perplexity']:>8.3f}")
print(f"{'PPO':<10}{ppo['gold']:>8.3f}{ppo['rm_score']:>10.3f}{ppo['kl']:>8.3f}{ppo['perplexity']:>8.3f}")
print(f"PPO wins {ev['win_rate']:.1%} of {ev['prompts']} test prompts against SFT under the gold judge (ties half)")
print(f"reward model: {summary['reward']['val_accuracy']:.1%} of held-out pairs ordered as gold orders them")
s = summary["seconds"]
print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s.items()))
print("\nsome test prompts (gold score in brackets):")
for ex in ev["examples"]:
    print("-" * 80 + "\n" + ex["prompt"].split("\n")[0])
    print(f"  SFT [{ex['gold'][1]:+.1f}]:{ex['responses'][1]}")
    print(f"  PPO [{ex['gold'][0]:+.1f}]:{ex['responses'][0]}")
print(f"\nwrote {out}/summary.json")
EOF
