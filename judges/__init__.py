"""
Judges: Python functions that score responses, and the simulated raters built on one.

A judge is a function `fn(prompts, responses) -> [float]`, one score per response, higher
better, named as FILE.py:fn (e.g. judges/great_day.py:great_day). The same judge can rank
candidates (rate.py), be PPO's reward (ppo.py --reward_fn), watch PPO's held-out prompts
(ppo.py --judge) and score checkpoints (eval.py --judge).

A simulated rater ranks a prompt's responses by Plackett-Luce, the K-way form of the noisy
Bradley-Terry choice (Luce 1959, Plackett 1975): the best is drawn with probability proportional
to exp(score / temperature), then the best of the rest, and so on. The built-in tasks' raters
(data/task.py) are such raters over their hidden gold score.
"""

import importlib.util
import math
import numbers
import os

from common import ConfigError


class JudgeError(ConfigError):
    """A judge that cannot be loaded or that answered wrongly; the message names it."""


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


def judge_fn(spec):
    """The judge that spec names, as a function whose every answer is checked (judge_scores)."""
    judge = load_judge(spec)
    return lambda prompts, responses: judge_scores(judge, spec, prompts, responses)


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


# ----------------------------------------------------------------------------- simulated raters

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
