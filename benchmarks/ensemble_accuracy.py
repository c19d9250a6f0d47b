"""
How often a reward-model ensemble orders the held-out pairs as the hidden gold does: each member
alone, and the members' mean (the score PPO optimises at --uncertainty_coef 0). For a task of the
suite: the held-out rankings are the ones reward.py held out of the same file (--val_frac 0.1, by
prompt), and a pair counts when the gold scores of its two responses differ, as reward.py's
val/gold_accuracy counts it.

    python benchmarks/ensemble_accuracy.py --dir runs/suite/sort/s0 --reward reward_ens3
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import run_main  # noqa: E402
from data.formats import DataError, load_rankings, split_rankings  # noqa: E402
from data.tasks import task_of  # noqa: E402
from data.tokenizer import encode_rankings, get_tokenizer  # noqa: E402
from scoring import gold_agreement, load_ensemble, score_sequences  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--dir", required=True, help="a task-seed's folder with rankings.jsonl and the reward model")
    p.add_argument("--reward", default="reward_ens3", help="the reward model's folder inside --dir")
    p.add_argument("--val_frac", type=float, default=0.1, help="as reward.py's --val_frac")
    args = p.parse_args()
    members = load_ensemble(f"{args.dir}/{args.reward}/ckpt.pt")
    enc = get_tokenizer(members[0].config.tokenizer)
    _, val_rows = split_rankings(load_rankings(f"{args.dir}/rankings.jsonl", stats={}), args.val_frac)
    val = encode_rankings(enc, val_rows, members[0].config.block_size, {})
    task = task_of(row["prompt"] for _, _, row in val)
    if task is None:
        raise DataError(f"{args.dir}/rankings.jsonl: not the prompts of a task of the suite, so there is no gold to compare with")
    seqs = [s for ss, _, _ in val for s in ss]
    with torch.no_grad():
        scores = torch.stack([score_sequences(m, seqs, enc.eot_token, "cpu") for m in members])  # (K, N)
    accuracy = [right / total for right, total in (gold_agreement(s, val, task) for s in [*scores, scores.mean(0)])]
    print(f"{args.dir}/{args.reward}: members " + " ".join(f"{a:.1%}" for a in accuracy[:-1]) + f", mean {accuracy[-1]:.1%}")


if __name__ == "__main__":
    run_main(main)
