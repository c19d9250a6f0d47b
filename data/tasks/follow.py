"""
Follow a formatting instruction: describe a topic in so many words, starting or ending with a
given word, or without it.

    prompt:   "describe the sea in 4 words, ending with tide.\nbot:"
    best:     " waves salt blue tide"

- 3616 prompts: 16 topics x 2 verbs x (a word count of 2-6 or none) x (start with / end with /
  avoid one of the topic's 6 words, or none), at least one of the two; split 80/10/10 by hash
  (2909 / 358 / 349).
- The demonstrator writes 3-8 words about the topic: the topic's words in their usual order from
  a random one on, with a few fillers ("and", "very"). It keeps each constraint only half the time; when it ignores "without the
  word W" it uses W four times in five (the word is right there in the prompt); now and then it
  opens with "ok:", repeats a word or strays to another topic's word.
- Gold: 2 x the mean over the constraints of 1 (kept) down to -0.5 (broken), where a length is
  always one of them (the count asked, else 3-8 words: a description), 1 point for the share of
  non-filler words on the topic, -0.5 for a repeated word. Best possible: 3.0; the demonstrator's
  mean on the test prompts is 1.54.
- Why it is hard for a reward model: whether a constraint is kept depends on counting words and on
  reading which instruction the prompt gives, while the surface says little: the same word W is
  right at the end for "ending with W" and wrong anywhere for "without the word W". In the
  demonstrations, shorter responses keep counts more often (asked 2-6 words, the demonstrator
  writes 3-8 when it ignores them), so "short is good" is a shortcut that fails for 5 and 6.
  Measured once (2026-12-04, CPU): the default sft.py on the train split's demonstrations (6000 at
  most), then reward.py on 2000 train prompts x 4 SFT samples ranked by these raters, scoring
  hand-made pairs on test prompts: the reward model put a kept count above one word too many on
  74% of 192, a response without the banned word above one ending with it on 57% of 113, and the
  asked last word last above it first on 42% of 125: it barely reads the word rules.
"""

import functools
import re

from data.tasks import base

NAME = "follow"
TOPICS = {
    "sea": "waves salt blue deep tide foam",
    "sun": "bright warm yellow light hot glow",
    "rain": "wet drops grey cloud storm puddle",
    "snow": "white cold flakes ice frost soft",
    "forest": "trees green moss leaves shade pine",
    "city": "busy streets loud towers cars crowds",
    "desert": "sand dry dunes heat cactus dust",
    "night": "dark stars moon quiet black owls",
    "garden": "flowers roses seeds soil bees grass",
    "river": "flowing water stream fish banks cool",
    "mountain": "tall peaks rock steep climb summit",
    "fire": "flames smoke burning red embers sparks",
    "bread": "crust baked fresh loaf flour crumbs",
    "music": "songs notes rhythm drums melody tune",
    "school": "books lessons desks chalk pupils bell",
    "train": "tracks rails engine station whistle fast",
}
TOPICS = {t: words.split() for t, words in TOPICS.items()}
FILLERS = ("and", "very", "so", "with")
VERBS = ("describe the {topic}", "write about the {topic}")
COUNTS = (2, 3, 4, 5, 6)
WORD_RULES = ("starting with {w}", "ending with {w}", "without the word {w}")
PROMPT_SUFFIX = "\nbot:"
BPE_MERGES = 400  # every topic word one token (the merges run out at about 360)

P_KEEP = 0.5  # the demonstrator keeps each constraint this often
P_USES_BANNED = 0.8  # ... and when it ignores "without the word W", uses W this often
P_OPENING, P_REPEAT, P_STRAY = 0.15, 0.1, 0.08

# The raters and the temperature of each one's Plackett-Luce choice over gold.
RATERS = {"ann": 0.3, "ben": 0.6, "cat": 1.2}


@functools.lru_cache(maxsize=None)
def _all_prompts():
    out = []
    for topic, words in TOPICS.items():
        for verb in VERBS:
            for count in (None,) + COUNTS:
                for rule in (None,) + WORD_RULES:
                    for w in (words if rule else [None]):
                        if count is None and rule is None:
                            continue  # no instruction to follow
                        text = verb.format(topic=topic)
                        text += f" in {count} words" if count else ""
                        text += ", " + rule.format(w=w) if rule else ""
                        out.append(text + "." + PROMPT_SUFFIX)
    return tuple(out)


prompts = base.splits(_all_prompts)  # prompts(split): every prompt of a split, in a fixed shuffled order


PROMPT_RE = re.compile(r"(?:describe|write about) the (\w+)(?: in (\d) words)?"
                       r"(?:, (starting with|ending with|without the word) (\w+))?\.\nbot:$")


def parse_prompt(prompt):
    """(topic, word count or None, "start" / "end" / "avoid" or None, the rule's word or None)."""
    m = PROMPT_RE.match(prompt)
    ok = (m is not None and m.group(1) in TOPICS and (m.group(2) or m.group(3))
          and (m.group(2) is None or int(m.group(2)) in COUNTS)
          and (m.group(4) is None or m.group(4) in TOPICS[m.group(1)]))
    if not ok:
        raise ValueError(f"not a prompt of the follow task: {prompt!r}")
    rule = {"starting with": "start", "ending with": "end", "without the word": "avoid", None: None}[m.group(3)]
    return m.group(1), m.group(2) and int(m.group(2)), rule, m.group(4)


is_task_prompt = base.parses(parse_prompt)  # True for this task's prompts


def best_response(prompt):
    """The topic's own words, as many as asked (4 if no count), the rule's word first or last or
    left out; a filler only where the topic runs out of words."""
    topic, count, rule, w = parse_prompt(prompt)
    n = count or 4
    body = [x for x in TOPICS[topic] if x != w][:n - (rule in ("start", "end"))]
    while len(body) < n - (rule in ("start", "end")):
        body.insert(len(body) - 1, "and")
    words = [w] + body if rule == "start" else body + [w] if rule == "end" else body
    return " " + " ".join(words)


def demonstrate(prompt, rng):
    """The noisy demonstrator's response to a prompt."""
    topic, count, rule, w = parse_prompt(prompt)
    # the topic's words in their usual order from a random one on (in a random order, the default
    # SFT run repeated a word in 59% of its samples), now and then a filler between two of them
    start = rng.randrange(len(TOPICS[topic]))
    own = TOPICS[topic][start:] + TOPICS[topic][:start]
    n = count if count and rng.random() < P_KEEP else rng.randint(3, 8)
    words = []
    for _ in range(n):
        if words and words[-1] not in FILLERS and rng.random() < 0.2:
            words.append(rng.choice(FILLERS))
        else:
            words.append(own.pop(0) if own else rng.choice(FILLERS))
    if rule is not None:
        keep = rng.random() < P_KEEP
        if w in words:
            words.remove(w)
            words.append(rng.choice([x for x in TOPICS[topic] if x not in words and x != w] or FILLERS))
        if keep and rule == "start":
            words[0] = w
        elif keep and rule == "end":
            words[-1] = w
        elif not keep and rng.random() < (P_USES_BANNED if rule == "avoid" else 0.3):
            words[rng.randrange(len(words))] = w  # the prompt's word, somewhere
    for i, x in enumerate(words):
        if x not in FILLERS and x != w and rng.random() < P_STRAY:
            words[i] = rng.choice(TOPICS[rng.choice([t for t in TOPICS if t != topic])])
    if rng.random() < P_REPEAT:
        words[rng.randrange(len(words))] = rng.choice([x for x in words if x not in FILLERS] or words)
    if rng.random() < P_OPENING:
        words.insert(0, "ok:")
    return " " + " ".join(words) + ("." if rng.random() < 0.5 else "")


def demonstrations(split, n=None, seed=0):
    """[{prompt, response}] from the demonstrator on the first n prompts of a split."""
    return base.demonstrations(demonstrate, prompts(split)[:n], seed)


def _kept(distance):
    """1 for a constraint kept, less by 0.75 per word off, down to -0.5."""
    return max(-0.5, 1.0 - 0.75 * distance)


def judge(prompt, response):
    """What the gold judge sees, constraint by constraint."""
    topic, count, rule, w = parse_prompt(prompt)
    words = [x.strip(".,:!?") for x in response.split()]
    words = [x for x in words if x]
    content = [x for x in words if x not in FILLERS]
    n = len(words)
    j = {
        "words": n,
        # asked for a count: words off it; not asked: off the 3-8 words a description takes
        "length": _kept(abs(n - count) if count else max(0, 3 - n, n - 8)),
        "rule": None,
        "on_topic": sum(x in TOPICS[topic] for x in content) / len(content) if content else 0.0,
        "repeated": len(set(content)) < len(content),
    }
    if rule is not None:
        j["rule"] = {"start": words[:1] == [w], "end": words[-1:] == [w], "avoid": w not in words}[rule] * 1.5 - 0.5
    return j


def gold_score(prompt, response):
    """The hidden judgment. Best possible: 3.0 (every constraint kept, every word on the topic,
    none repeated)."""
    j = judge(prompt, response)
    if j["words"] == 0:
        return -2.0
    kept = [j["length"]] + ([j["rule"]] if j["rule"] is not None else [])
    return 2.0 * sum(kept) / len(kept) + 1.0 * j["on_topic"] - 0.5 * j["repeated"]


# the gold score as a judge, gold(prompts, responses) -> [float] (rate.py, eval.py --judge, ppo.py --judge
# FILE.py:gold), and the simulated raters that rank by it: rank(prompt, responses, rater, rng), rate(candidates)
gold, rank, rate = base.judged_by(gold_score, RATERS)


def corpus():
    """Text for the task's tokenizer: prompts and many responses, every word of every topic."""
    return base.corpus(demonstrate, prompts("train")[:1500], _all_prompts(), [" " + " ".join(words) + "." for words in TOPICS.values()] * 3)
