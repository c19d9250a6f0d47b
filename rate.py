"""
Rank candidates with a judge: simulated raters instead of people (rules, or AI feedback).

A judge is a Python function that takes a list of prompts and a list of responses and returns a
list of floats, one score per response, higher better; it is named as FILE.py:function. The
same judge can rank candidates here, be PPO's reward (ppo.py --reward_fn), watch PPO's held-out
prompts (ppo.py --judge) and score checkpoints (eval.py --judge). The built-in task's gold
score is one (data/task.py:gold), and its simulated raters rank as this file does.

    python rate.py --candidates out/candidates.jsonl --judge judges/great_day.py:great_day --out out/rankings.jsonl
    python rate.py --candidates out/candidates.jsonl --judge data/task.py:gold --temperature 0.3 --raters 2

Each simulated rater ranks a prompt's responses by Plackett-Luce (judges/__init__.py): the best
is drawn with probability proportional to exp(score / temperature), then the best of the rest,
and so on. At --temperature 0 the rater sorts by score and ties equal scores; above 0 only
identical responses are tied. The rankings file is the one label.py writes, so reward.py and
label.py --stats read it.
"""

import os
import random
from dataclasses import dataclass

from tqdm import tqdm

from common import ConfigError, parse_config, run_main
from data.formats import DataError, load_candidates, write_jsonl
from judges import judge_scores, load_judge, rank


@dataclass
class Config:
    candidates: str = "out/candidates.jsonl"  # candidates JSONL {prompt, responses}, e.g. from sample.py
    judge: str = ""  # the judge FILE.py:function(prompts, responses) -> [float]
    out: str = "out/rankings.jsonl"  # rankings JSONL to write (prompt, responses, ranking, rater)
    temperature: float = 0.0  # each rater's noise: Plackett-Luce over score / temperature (0: sort by score, ties tied)
    raters: int = 1  # simulated raters: each ranks every prompt, with a random stream of its own
    batch_size: int = 512  # responses per call to the judge
    seed: int = 0  # same seed, same rankings


def main():
    cfg = parse_config(Config)
    if not cfg.judge:
        raise ConfigError("rate.py needs --judge FILE.py:function, e.g. --judge judges/great_day.py:great_day")
    if cfg.raters < 1 or cfg.temperature < 0:
        raise ConfigError(f"--raters must be 1 or more and --temperature 0 or more, got {cfg.raters} and {cfg.temperature}")
    judge = load_judge(cfg.judge)
    candidates = load_candidates(cfg.candidates)
    rankable = [c for c in candidates if len(set(c["responses"])) >= 2]  # one distinct response leaves nothing to rank
    skipped = len(candidates) - len(rankable)
    if not rankable:
        raise DataError(f"{cfg.candidates}: no prompt has 2 or more distinct responses to rank; sample with --k 2 or more")
    candidates = rankable

    # every response scored once, in batches, whatever the number of raters
    prompts = [c["prompt"] for c in candidates for _ in c["responses"]]
    responses = [r for c in candidates for r in c["responses"]]
    scores = []
    for s in tqdm(range(0, len(responses), cfg.batch_size), desc="judge", disable=None, leave=False):
        scores += judge_scores(judge, cfg.judge, prompts[s:s + cfg.batch_size], responses[s:s + cfg.batch_size])

    name = cfg.judge.rpartition(":")[2]
    raters = [name] if cfg.raters == 1 else [f"{name}-{i + 1}" for i in range(cfg.raters)]
    rngs = [random.Random(f"{cfg.seed}/{rater}") for rater in raters]  # a stream of its own per rater
    rows, start = [], 0
    for c in candidates:
        own = scores[start:start + len(c["responses"])]
        start += len(c["responses"])
        for rater, rng in zip(raters, rngs):
            rows.append({"prompt": c["prompt"], "responses": c["responses"],
                         "ranking": rank(c["responses"], own, cfg.temperature, rng), "rater": rater})
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    write_jsonl(cfg.out, rows)
    all_tied = sum(len(r["ranking"]) == 1 for r in rows)
    print(f"rate done: {len(candidates)} prompts ({skipped} skipped: fewer than 2 distinct responses), {len(responses)} responses judged by {cfg.judge} "
          f"(mean score {sum(scores) / max(1, len(scores)):.4g}) | {len(rows)} rankings by {len(raters)} rater(s) at "
          f"temperature {cfg.temperature}, {all_tied} all tied | saved {cfg.out}")


if __name__ == "__main__":
    run_main(main)
