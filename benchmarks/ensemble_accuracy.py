"""
How often a reward-model ensemble orders reward.py's held-out pairs as the hidden gold does: each
member alone, and the members' mean (the score PPO optimises at --uncertainty_coef 0). A built-in
task's run only: its rankings, its SFT trunk and the ensemble.

    python benchmarks/ensemble_accuracy.py --dir runs/suite/sort/s0 --reward reward_ens3
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reward  # noqa: E402
from common import parse_config  # noqa: E402
from data.formats import load_rankings  # noqa: E402
from data.tokenizer import get_tokenizer, ranking_data  # noqa: E402
from scoring import load_ensemble  # noqa: E402


class Mean(torch.nn.Module):
    """The members' mean score at every position, as one model."""

    def __init__(self, members):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, ids, mask=None):
        return torch.stack([m(ids, mask) for m in self.members]).mean(0)


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--dir", required=True, help="a task-seed's folder: rankings.jsonl, sft/ckpt.pt and the reward model")
    p.add_argument("--reward", default="reward_ens3", help="the reward model's folder inside --dir")
    args = p.parse_args()
    # the held-out split reward.py made: its own defaults on the same rankings
    cfg = parse_config(reward.Config, ["--data", f"{args.dir}/rankings.jsonl", "--init", f"{args.dir}/sft/ckpt.pt"])
    members = load_ensemble(f"{args.dir}/{args.reward}/ckpt.pt")
    enc = get_tokenizer(members[0].config.tokenizer)
    _, val, _ = ranking_data(cfg, load_rankings(cfg.data, stats={}), enc, members[0].config.block_size, {}, stage="reward")
    accuracy = [reward.evaluate(m, val, enc.eot_token, "cpu")["val/gold_accuracy"] for m in [*members, Mean(members)]]
    print(f"{args.dir}/{args.reward}: members " + " ".join(f"{a:.1%}" for a in accuracy[:-1]) + f", mean {accuracy[-1]:.1%}")


if __name__ == "__main__":
    main()
