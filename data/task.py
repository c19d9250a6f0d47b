"""
The built-in task: a small help desk that adds numbers, standing in for real human feedback.

    prompt:   "mia: can you add 3 and 4?\nbot:"
    best:     " hi mia! 3 plus 4 is 7. glad to help!"

- Prompts come from a generator (names x numbers x phrasings), split into disjoint
  train / val / test sets by a hash of the prompt text.
- The demonstrator that SFT imitates is noisy: it sometimes gets the sum wrong (5%), greets
  by name only sometimes (and sometimes by the wrong name), rambles, and is rude a quarter of
  the time. SFT learns that mixture, so it is mediocre, and RLHF has room to improve.
- A hidden gold score combines correctness, helpfulness (greeting the person by name),
  politeness and brevity. It stands for human judgment: the reward model and PPO never see
  it; eval.py uses it as the judge.
- Simulated raters rank K responses by a noisy Bradley-Terry choice over the gold score
  (Plackett-Luce, its K-way form: judges/), each rater with their own noise, and write the
  rankings file that a person labelling with label.py would write. `gold` is the gold score as a
  judge function, so `python rate.py --judge data/task.py:gold` ranks by it too.

    python -m data.tasks rate --task add --candidates out/candidates.jsonl --out out/rankings.jsonl
"""

import random
import re

from data.tasks import base

NAME = "add"  # its name in the suite (data/tasks)
NAMES = ("mia ana bob cal dee eli fay gus hal ida jon kim leo max ned oli pam quin rex sam "
         "tom uma val wes xia yan zoe abe bea cyd dot eve fin gil hop ike jay kai liv mo").split()
NUMBERS = range(10)
TEMPLATES = (
    "{name}: what is {a} plus {b}?",
    "{name}: can you add {a} and {b}?",
    "{name}: please tell me {a} plus {b}.",
    "{name}: how much is {a} plus {b}?",
)
PROMPT_SUFFIX = "\nbot:"
BPE_MERGES = 400  # enough for every word of the task to become one token

# The demonstrator's habits: (probability, text) for each part of a response, in order.
GREETINGS = ((0.35, "hi {name}!"), (0.25, "hello!"), (0.25, ""), (0.15, "hi {other}!"))
FILLERS = ((0.5, ""), (0.3, "um, let me think."), (0.2, "um, let me think. this is a hard one."))
CLOSINGS = ((0.3, "glad to help!"), (0.15, "glad to help! have a great day!"), (0.3, ""),
            (0.25, "ugh, that was easy."))
P_CORRECT = 0.95

# The raters and how noisy each is: the temperature of their Bradley-Terry choice over gold.
RATERS = {"ann": 0.2, "ben": 0.3, "cat": 0.5}


def prompts(split):
    """Every prompt of a split, in a fixed shuffled order."""
    return base.split([t.format(name=n, a=a, b=b) + PROMPT_SUFFIX
                       for n in NAMES for a in NUMBERS for b in NUMBERS for t in TEMPLATES], split)


PROMPT_RE = re.compile(r"(\w+): .*?(\d+) (?:plus|and) (\d+)[?.]\nbot:$")


def is_task_prompt(prompt):
    """True for the built-in task's prompts (the ones the gold judge can score)."""
    return PROMPT_RE.match(prompt) is not None


def parse_prompt(prompt):
    m = PROMPT_RE.match(prompt)
    if m is None:
        raise ValueError(f"not a prompt of the built-in task: {prompt!r}")
    return m.group(1), int(m.group(2)), int(m.group(3))


def demonstrate(prompt, rng):
    """The noisy demonstrator's response to a prompt."""
    name, a, b = parse_prompt(prompt)
    other = rng.choice([n for n in NAMES if n != name])
    c = a + b if rng.random() < P_CORRECT else max(0, a + b + rng.choice([-2, -1, 1, 2]))
    parts = [base.pick(GREETINGS, rng).format(name=name, other=other), base.pick(FILLERS, rng),
             f"{a} plus {b} is {c}.", base.pick(CLOSINGS, rng)]
    return " " + " ".join(p for p in parts if p)


def demonstrations(split, n=None, seed=0):
    """[{prompt, response}] from the demonstrator on the first n prompts of a split."""
    return base.demonstrations(demonstrate, prompts(split)[:n], seed)


def judge(prompt, response):
    """What the gold judge sees in a response, criterion by criterion."""
    name, a, b = parse_prompt(prompt)
    claims = re.findall(r"\bis (\d+)", response)
    words = response.split()
    own_name = f"hi {name}!" in response
    return {
        "answered": bool(claims),
        "correct": bool(claims) and all(int(c) == a + b for c in claims),
        "own_name": own_name,
        "wrong_name": not own_name and any(w.strip("!.,?") in NAMES for w in words),
        "polite": "glad to help" in response,
        "rude": "ugh" in response or "easy" in response,
        "rambling": "um," in response,
        "words": len(words),
    }


def gold_score(prompt, response):
    """The hidden judgment. Best possible: 3.0 (correct, greets by name, polite, <= 10 words)."""
    j = judge(prompt, response)
    score = (2.0 if j["correct"] else -1.0) if j["answered"] else -1.5  # correct / wrong / no answer at all
    score += 0.5 * j["own_name"] - 0.5 * j["wrong_name"]  # helpful: speaks to the person, not someone else
    score += 0.5 * j["polite"] - 1.0 * j["rude"]
    score -= 0.1 * max(0, j["words"] - 10)  # brief
    return score


# the gold score as a judge, gold(prompts, responses) -> [float] (rate.py, eval.py --judge, ppo.py --judge
# FILE.py:gold), and the simulated raters that rank by it: rank(prompt, responses, rater, rng), rate(candidates)
gold, rank, rate = base.judged_by(gold_score, RATERS)


def corpus():
    """Text for training the task's tokenizer: every name and number, and many responses."""
    lines = [demonstrate(p, random.Random(i)) for i, p in enumerate(prompts("train")[:2000])]
    lines += [t.format(name=n, a=a, b=b) + PROMPT_SUFFIX for n in NAMES for a in NUMBERS
              for b in NUMBERS for t in TEMPLATES][::7]
    lines += [f" is {c}." for c in range(40)] + [f" hi {n}!" for n in NAMES]
    return "\n".join(lines)
