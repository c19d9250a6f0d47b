"""
The closing summary of train.sh: every method's eval file against SFT, round by round, written to
OUT/summary.json and printed as a table.

    python scripts/summary.py out 1 ppo dpo       # OUT, ROUNDS, then the methods that ran

Each method's round-r result is OUT[/round{r}]/eval_{method}.json (eval.py --init METHOD --compare
SFT); OUT/seconds.txt holds each step's seconds (train.sh's `timed`).
"""

import json
import os
import sys
from collections import defaultdict

import torch


def result(path):
    """(the policy's entry, SFT's entry) from an eval file written with --compare SFT."""
    ev = json.load(open(path))
    (_, m), (_, sft) = ev["models"].items()
    return {"gold": m["gold"], "rm_score": m.get("rm_score"), "kl_exact": m["kl_exact"], "win_rate_vs_sft": ev["win_rate"],
            "perplexity": m["perplexity"]}, sft, ev


def num(v, width):
    return f"{v:>{width}.3f}" if v is not None else f"{'-':>{width}}"


def main(out, rounds, methods):
    seconds = defaultdict(float)
    for line in open(f"{out}/seconds.txt"):
        name, s = line.split()
        seconds[name] += float(s)
    seconds["total"] = sum(seconds.values())

    rows, sft, last_eval = [], None, {}
    for r in range(1, rounds + 1):
        d = out if r == 1 else f"{out}/round{r}"
        row = {"round": r}
        for method in methods:
            row[method], sft, last_eval[method] = result(f"{d}/eval_{method}.json")
        rows.append(row)
    sft_ckpt = torch.load(f"{out}/sft/ckpt.pt", map_location="cpu", weights_only=True)
    summary = {"sft": {"gold": sft["gold"], "val_loss": sft_ckpt["val_loss"], "perplexity": sft["perplexity"]}}
    if os.path.exists(f"{out}/reward/ckpt.pt"):
        rm_ckpt = torch.load(f"{out}/reward/ckpt.pt", map_location="cpu", weights_only=True)
        summary["reward"] = {"val_accuracy": rm_ckpt["val/gold_accuracy"],  # against the gold ordering
                             "val_accuracy_raters": rm_ckpt["val/accuracy"]}  # against the raters' rankings
    summary.update({m: rows[-1][m] for m in methods})  # the last round's policies
    n_eval = last_eval[methods[0]]["prompts"]
    summary.update({"rounds": rows, "eval_prompts": n_eval, "seconds": dict(seconds)})
    with open(f"{out}/summary.json", "w") as f:
        json.dump(summary, f, indent=2)

    print(f"\n{'':<14}{'gold':>8}{'rm_score':>10}{'kl':>8}{'ppl':>8}{'win vs SFT':>12}")
    print(f"{'SFT':<14}{num(sft['gold'], 8)}{num(sft.get('rm_score'), 10)}{num(sft['kl_exact'], 8)}{num(sft['perplexity'], 8)}")
    for k in methods:
        m = summary[k]
        print(f"{k.upper():<14}{num(m['gold'], 8)}{num(m['rm_score'], 10)}{num(m['kl_exact'], 8)}{num(m['perplexity'], 8)}"
              f"{m['win_rate_vs_sft']:>12.1%}")
    if rounds > 1:
        print("\nround by round: gold score (win rate against SFT)")
        for row in rows:
            print(f"  round {row['round']}: " + " | ".join(f"{k.upper()} {row[k]['gold']:.3f} ({row[k]['win_rate_vs_sft']:.1%})"
                                                       for k in methods))
    for k in methods:
        print(f"{k.upper()} wins {summary[k]['win_rate_vs_sft']:.1%} of {n_eval} test prompts against SFT under the gold judge (ties half)")
    if "reward" in summary:
        print(f"reward model: {summary['reward']['val_accuracy']:.1%} of held-out pairs ordered as gold orders them")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    name = methods[0]
    print(f"\nsome test prompts, {name.upper()} of the last round against SFT (gold score in brackets):")
    for ex in last_eval[name]["examples"]:
        print("-" * 80 + "\n" + ex["prompt"].split("\n")[0])
        print(f"  SFT [{ex['gold'][1]:+.1f}]:{ex['responses'][1]}")
        print(f"  {name.upper()} [{ex['gold'][0]:+.1f}]:{ex['responses'][0]}")
    print(f"\nwrote {out}/summary.json")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
