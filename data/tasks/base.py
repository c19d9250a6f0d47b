"""What every task does the same way, the built-in (data/task.py) too: the hash split, the
demonstrations list, and the simulated raters (Plackett-Luce over the task's gold score).
Each task module calls these through its own `prompts`, `demonstrations`, `rank` and `rate`, so
that a stage can use any task by the same names."""

import random

from data.formats import prompt_hash
from judges import rank as rank_by_scores  # Plackett-Luce over a judge's scores


def split_of(prompt):
    """'train', 'val' or 'test', fixed by the prompt's text (as the built-in's: 80/10/10)."""
    h = prompt_hash(prompt) % 10
    return "test" if h == 0 else "val" if h == 1 else "train"


def split(all_prompts, name):
    """The prompts of one split, in a fixed shuffled order."""
    out = [p for p in all_prompts if split_of(p) == name]
    random.Random(0).shuffle(out)
    return out


def pick(options, rng):
    """One text from ((probability, text), ...), the probabilities summing to 1."""
    r, acc = rng.random(), 0.0
    for p, text in options:
        acc += p
        if r < acc:
            return text
    return options[-1][1]


def demonstrations(demonstrate, prompts, seed):
    """[{prompt, response}] from a task's demonstrator, one seeded stream for the whole list."""
    rng = random.Random(seed)
    return [{"prompt": p, "response": demonstrate(p, rng)} for p in prompts]


def rank(gold, temperature, prompt, responses, rng):
    """One rater's ranking, best first, as groups of tied indices: Plackett-Luce over the gold
    score at the rater's temperature (judges.rank). Identical responses are tied."""
    return rank_by_scores(responses, gold([prompt] * len(responses), responses), temperature, rng)


def rate(rank_fn, raters, candidates, seed, second_opinion):
    """Rankings rows for [{prompt, responses}]: each prompt ranked by one random rater, a fraction
    by a second, so agreement can be measured (the same draws as data/task.py's rate)."""
    rng = random.Random(seed)
    rows = []
    for c in candidates:
        chosen = rng.sample(sorted(raters), 2 if rng.random() < second_opinion else 1)
        for rater in chosen:
            rows.append({"prompt": c["prompt"], "responses": c["responses"],
                         "ranking": rank_fn(c["prompt"], c["responses"], rater, rng), "rater": rater})
    return rows
