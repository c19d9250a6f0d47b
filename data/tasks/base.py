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


def parses(parse_prompt):
    """A task's is_task_prompt: True for a prompt its parse_prompt reads."""
    def is_task_prompt(prompt):
        try:
            parse_prompt(prompt)
            return True
        except ValueError:
            return False
    return is_task_prompt


def split(all_prompts, name):
    """The prompts of one split, in a fixed shuffled order."""
    out = [p for p in all_prompts if split_of(p) == name]
    random.Random(0).shuffle(out)
    return out


def splits(all_prompts):
    """A task's prompts(split) from the function that lists all its prompts."""
    return lambda name: split(all_prompts(), name)


def corpus(demonstrate, train_prompts, all_prompts, extra):
    """Text for a task's tokenizer: the demonstrator's responses to train_prompts, 600 of its
    prompts, and the extra lines that hold every word the task can say."""
    lines = [demonstrate(p, random.Random(i)) for i, p in enumerate(train_prompts)]
    return "\n".join(lines + random.Random(0).sample(all_prompts, 600) + list(extra))


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


def judged_by(gold_score, raters, seen_score=None):
    """A task's gold score as a judge, and its simulated raters: the functions gold(prompts,
    responses) -> [float], rank(prompt, responses, rater, rng) (one rater's ranking, as rank above)
    and rate(candidates, seed=0, second_opinion=0.2) (rankings rows, as rate above). The raters rank
    by seen_score(prompt, response) where it is given (what they can see: gold with blind spots),
    else by gold."""
    def gold(prompts, responses):
        return [gold_score(p, r) for p, r in zip(prompts, responses)]

    def seen(prompts, responses):
        return [(seen_score or gold_score)(p, r) for p, r in zip(prompts, responses)]

    def rank_by(prompt, responses, rater, rng):
        return rank(seen, raters[rater], prompt, responses, rng)

    def rate_by(candidates, seed=0, second_opinion=0.2):
        return rate(rank_by, raters, candidates, seed, second_opinion)

    return gold, rank_by, rate_by
