"""
Rank candidates with a judge: simulated raters instead of people (rules, or AI feedback).

A judge is a Python function that takes a list of prompts and a list of responses and returns a
list of floats, one score per response, higher better; it is named as FILE.py:function. The
same judge can rank candidates here, be PPO's reward (ppo.py --reward_fn), watch PPO's held-out
prompts (ppo.py --judge) and score checkpoints (eval.py --judge). The built-in task's gold
score is one (data/task.py:gold), and its simulated raters are this file's Plackett-Luce ranking.

    python rate.py --candidates out/candidates.jsonl --judge judges/great_day.py:great_day --out out/rankings.jsonl
    python rate.py --candidates out/candidates.jsonl --judge data/task.py:gold --temperature 0.3 --raters 2

Each simulated rater ranks a prompt's responses by Plackett-Luce, the K-way form of the noisy
Bradley-Terry choice (Luce 1959, Plackett 1975): the best is drawn with probability proportional
to exp(score / temperature), then the best of the rest, and so on. At --temperature 0 the rater
sorts by score and ties equal scores; above 0 only identical responses are tied. The rankings
file is the one label.py writes, so reward.py and label.py --stats read it.
"""

import importlib.util
import math
import numbers
import os
import random
from dataclasses import dataclass

from tqdm import tqdm

from common import ConfigError, parse_config, run_main
from data.formats import load_candidates, write_jsonl


@dataclass
class Config:
    candidates: str = "out/candidates.jsonl"  # candidates JSONL {prompt, responses}, e.g. from sample.py
    judge: str = ""  # the judge FILE.py:function(prompts, responses) -> [float]
    out: str = "out/rankings.jsonl"  # rankings JSONL to write (prompt, responses, ranking, rater)
    temperature: float = 0.0  # each rater's noise: Plackett-Luce over score / temperature (0: sort by score, ties tied)
    raters: int = 1  # simulated raters: each ranks every prompt, with a random stream of its own
    batch_size: int = 512  # responses per call to the judge
    seed: int = 0  # same seed, same rankings


class JudgeError(ConfigError):
    """A judge that cannot be loaded or that answered wrongly; the message names it."""


# ----------------------------------------------------------------------------- judges

def load_judge(spec):
    """The function named by 'path/to/file.py:function', imported from that file."""
    path, _, name = spec.rpartition(":")
    if not path.endswith(".py") or not name.isidentifier():
        raise JudgeError(f"judge {spec!r}: expected FILE.py:function, e.g. judges/great_day.py:great_day")
    if not os.path.isfile(path):
        raise JudgeError(f"judge {spec}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(f"judge_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise JudgeError(f"judge {spec}: importing {path} failed with {_what(e)}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise JudgeError(f"judge {spec}: {path} has no function {name}")
    return fn


def judge_scores(judge, spec, prompts, responses):
    """The judge's scores for the responses, as floats; a judge that raises, answers with the
    wrong count or answers something other than a finite number stops with one sentence that
    names the judge and the response."""
    prompts, responses = list(prompts), list(responses)
    if not responses:
        return []
    try:
        scores = judge(prompts, responses)
    except Exception as e:
        # call it on one response at a time to find the one it fails on (the first, if none alone)
        bad = next((r for p, r in zip(prompts, responses) if _raises(judge, p, r)), responses[0])
        raise JudgeError(f"judge {spec} failed with {_what(e)} on the response {_short(bad)}") from None
    try:
        scores = list(scores)
    except TypeError:
        raise JudgeError(f"judge {spec} returned {_short(scores)} for {len(responses)} responses (the first of them "
                         f"{_short(responses[0])}): expected a list of numbers") from None
    if len(scores) != len(responses):
        raise JudgeError(f"judge {spec} returned {len(scores)} scores for {len(responses)} responses "
                         f"(the first of them {_short(responses[0])})")
    for score, response in zip(scores, responses):
        if not isinstance(score, numbers.Real) or not math.isfinite(score):
            raise JudgeError(f"judge {spec} returned {_short(score)} for the response {_short(response)}: "
                             f"expected a finite number")
    return [float(s) for s in scores]


def _raises(judge, prompt, response):
    try:
        judge([prompt], [response])
        return False
    except Exception:
        return True


def _what(e):
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _short(x, n=60):
    text = repr(x)
    return text if len(text) <= n else text[:n] + "..."


# ----------------------------------------------------------------------------- ranking

def plackett_luce(scores, temperature, rng):
    """Indices best first: each next one drawn with probability proportional to
    exp(score / temperature) among those left."""
    left, order = list(range(len(scores))), []
    while left:
        top = max(scores[i] for i in left)  # subtracted so that exp never overflows
        i = rng.choices(left, [math.exp((scores[i] - top) / temperature) for i in left])[0]
        left.remove(i)
        order.append(i)
    return order


def rank(responses, scores, temperature, rng):
    """One simulated rater's ranking as groups of tied indices, best first ([[2], [0, 3], [1]]).
    temperature 0: sorted by score, equal scores tied; above: Plackett-Luce, identical responses tied."""
    if temperature == 0:
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        tied = lambda i, j: scores[i] == scores[j]  # noqa: E731
    else:
        order = plackett_luce(scores, temperature, rng)
        tied = lambda i, j: responses[i] == responses[j]  # noqa: E731
    groups = []
    for i in order:
        group = next((g for g in groups if tied(g[0], i)), None)
        if group is None:
            groups.append([i])
        else:
            group.append(i)
    return groups


def main():
    cfg = parse_config(Config)
    if not cfg.judge:
        raise ConfigError("rate.py needs --judge FILE.py:function, e.g. --judge judges/great_day.py:great_day")
    if cfg.raters < 1 or cfg.temperature < 0:
        raise ConfigError(f"--raters must be 1 or more and --temperature 0 or more, got {cfg.raters} and {cfg.temperature}")
    judge = load_judge(cfg.judge)
    candidates = load_candidates(cfg.candidates)

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
    print(f"rate done: {len(candidates)} prompts, {len(responses)} responses judged by {cfg.judge} "
          f"(mean score {sum(scores) / max(1, len(scores)):.4g}) | {len(rows)} rankings by {len(raters)} rater(s) at "
          f"temperature {cfg.temperature}, {all_tied} all tied | saved {cfg.out}")


if __name__ == "__main__":
    run_main(main)
