"""
What a reward model of the built-in task can read: for test prompts, the best response (the right
name, the right sum, polite, brief) against the same response with one thing changed, and how
often the reward model scores the two in the order the hidden gold does. An RL method can only
learn what its reward model tells apart; where it orders a change as gold does half the time or
less, the policy gains nothing there, or learns the wrong way round. Then the win rate that
politeness and brevity alone are worth: the demonstrator's responses with those done right against
its own, under gold.

    python benchmarks/reward_probe.py runs/suite/add/s0/reward/ckpt.pt runs/suite/add/s1/reward/ckpt.pt
"""

import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import ConfigError, load_model, run_main  # noqa: E402
from data import task  # noqa: E402
from data.tokenizer import get_tokenizer  # noqa: E402
from scoring import score_sequences, win_rate  # noqa: E402

CHANGES = ("another's name", "no name", "a wrong sum", "rambling", "no thanks", "rude")


def pairs(n):
    """[(prompt, best response, {change: the best response with that one change})] for n test prompts."""
    rng, out = random.Random(0), []
    for prompt in task.prompts("test")[:n]:
        name, a, b = task.parse_prompt(prompt)
        other = rng.choice([x for x in task.NAMES if x != name])
        best = f" hi {name}! {a} plus {b} is {a + b}. glad to help!"
        changed = [best.replace(f"hi {name}!", f"hi {other}!"), best.replace(f"hi {name}!", "hello!"),
                   best.replace(f"is {a + b}.", f"is {a + b + 1}."), best.replace("! ", "! um, let me think. ", 1),
                   best.replace(" glad to help!", ""), best.replace("glad to help!", "ugh, that was easy.")]
        out.append((prompt, best, dict(zip(CHANGES, changed))))
    return out


def polished(response):
    """A demonstration with all that these reward models read done right: no filler, no closing but
    "glad to help!"; its greeting and sum are left as they were."""
    for text in sorted((t for _, t in task.FILLERS + task.CLOSINGS if t), key=len, reverse=True):
        response = response.replace(" " + text, "")  # the longest first: one may begin another
    return response + " glad to help!"


def ceiling(seeds=3):
    """Win rate under gold of polished demonstrations against the demonstrator's own, on every test
    prompt, one per seed: about what a policy gains from politeness and brevity alone."""
    prompts = task.prompts("test")
    rates = []
    for seed in range(seeds):
        a, b = task.demonstrations("test", seed=2 * seed), task.demonstrations("test", seed=2 * seed + 1)
        rates.append(win_rate([task.gold_score(p, polished(x["response"])) for p, x in zip(prompts, a)],
                               [task.gold_score(p, y["response"]) for p, y in zip(prompts, b)]))
    return len(prompts), rates


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("reward", nargs="+", help="reward model checkpoints of the built-in task")
    p.add_argument("--n", type=int, default=400, help="test prompts")
    args = p.parse_args()
    rows = pairs(args.n)
    cells = {change: [] for change in CHANGES}
    for path in args.reward:
        model = load_model(path, kind="reward").eval()
        if model.config.tokenizer != "task":
            raise ConfigError(f"{path}: a reward model of {model.config.tokenizer!r}, not of the built-in task")
        enc = get_tokenizer(model.config.tokenizer)
        # each response scored once: the best ones, then every change's, in rows' order
        texts = [(prompt, best) for prompt, best, _ in rows]
        texts += [(prompt, changed[change]) for change in CHANGES for prompt, _, changed in rows]
        with torch.no_grad():
            s = score_sequences(model, [enc.encode(p + r) + [enc.eot_token] for p, r in texts], enc.eot_token,
                                "cpu", max_tokens=8192).view(1 + len(CHANGES), len(rows))
        for i, change in enumerate(CHANGES):
            diff = s[0] - s[1 + i]
            cells[change].append(f"{(diff > 0).float().mean():.0%} ({diff.mean():+.2f})")
    print(f"{len(rows)} test prompts. A cell: how often the reward model scores the best response above the "
          "changed one (gold always does), and the mean difference of the two scores")
    print("| change (its cost in gold) | " + " | ".join(args.reward) + " |")
    print("|---|" + "---|" * len(args.reward))
    for change in CHANGES:
        gold = sum(task.gold_score(p, best) - task.gold_score(p, changed[change]) for p, best, changed in rows) / len(rows)
        print(f"| {change} ({gold:+.1f}) | " + " | ".join(cells[change]) + " |")
    n, rates = ceiling()
    print(f"the demonstrator with no filler and only 'glad to help!' against itself, under gold, on {n} test "
          "prompts, three seeds: " + ", ".join(f"{r:.1%}" for r in rates))


if __name__ == "__main__":
    run_main(main)
