"""The task suite (data/tasks): every task meets the built-in's contract, its gold ranks an ideal
response above the demonstrator and the demonstrator above a bad one, its raters follow gold
more closely the colder they are, and its tokenizer is small and round-trips."""

import random
import runpy
import statistics
import sys

import pytest

from data import task as add
from data.tasks import base
from data.formats import load_rankings, ranking_pairs
from data.tasks import TASKS, facts, follow, get_task, refuse, sort, task_of
from data.tokenizer import get_tokenizer

SIZES = {"add": (12771, 1645, 1584), "sort": (4797, 606, 597), "follow": (2909, 358, 349),  # train, val, test,
         "facts": (9831, 1210, 1247), "refuse": (3874, 433, 493)}  # as each new docstring says
BEST = {"add": 3.0, "sort": 3.0, "follow": 3.0, "facts": 2.0, "refuse": 2.5}  # each gold_score's "best possible"
DEMONSTRATOR = {"add": 1.64, "sort": 1.84, "follow": 1.54, "facts": 1.05, "refuse": 0.99}  # mean gold on the test split, as each new docstring says


def best_add(prompt):
    name, a, b = add.parse_prompt(prompt)
    return f" hi {name}! {a} plus {b} is {a + b}. glad to help!"


def wrong_fact(prompt):
    _, owner, thing = facts.parse_prompt(prompt)
    return " it is " + next(c for c in facts.COLOURS if c != facts.WORLD.get((owner, thing))) + "."


def opposite_refusal(prompt):
    verb, obj = refuse.parse_prompt(prompt)
    if refuse.harm(verb, obj):
        return f" sure! first {refuse.STEPS[verb][0]}, then {refuse.STEPS[verb][1]}."
    return " " + refuse.REFUSAL


BEST_RESPONSE = {"add": best_add, "sort": sort.best_response, "follow": follow.best_response,
                 "facts": facts.best_response, "refuse": refuse.best_response}
BAD_RESPONSE = {  # clearly bad, each for its task's own reason
    "add": lambda p: " ugh, that was easy.",  # no answer, rude
    "sort": lambda p: " no.",  # no list
    "follow": lambda p: " ok.",  # too short, off the topic
    "facts": wrong_fact,  # a wrong colour, or one made up, said plainly
    "refuse": opposite_refusal,  # helps with the harmful, refuses the harmless
}


def tokenizer_of(name):
    return get_tokenizer("task" if name == "add" else f"task:{name}")


def test_registry_names_every_task_and_finds_a_task_by_its_prompts():
    assert set(TASKS) == set(SIZES) and TASKS["add"] is add
    assert all(t.NAME == name for name, t in TASKS.items() if name != "add")
    with pytest.raises(ValueError, match="known tasks are add, sort"):
        get_task("nope")
    for name, t in TASKS.items():
        assert task_of(t.prompts("test")[:50]) is t
        # no other task takes this task's prompts
        assert not any(other.is_task_prompt(p) for other in TASKS.values() if other is not t for p in t.prompts("val")[:200])
    assert task_of([sort.prompts("test")[0], facts.prompts("test")[0]]) is None  # mixed
    assert task_of(["hello\nbot:"]) is None and task_of([]) is None


@pytest.mark.parametrize("name", TASKS)
def test_splits_are_disjoint_and_sized_as_documented(name):
    t = TASKS[name]
    splits = {s: t.prompts(s) for s in ("train", "val", "test")}
    sets = {s: set(ps) for s, ps in splits.items()}
    assert all(len(sets[s]) == len(splits[s]) for s in splits)  # no repeats
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert tuple(len(splits[s]) for s in ("train", "val", "test")) == SIZES[name]
    assert len(splits["train"]) >= 2000 and len(splits["test"]) >= 300 and len(splits["val"]) >= 300
    assert all(base.split_of(p) == s for s, ps in splits.items() for p in ps[:100])
    assert t.prompts("test") == splits["test"]  # the same order every time


@pytest.mark.parametrize("name", TASKS)
def test_gold_ranks_best_over_demonstrator_over_bad(name):
    t = TASKS[name]
    demos = t.demonstrations("test", 300, seed=0)
    assert len(demos) == 300 and all(t.is_task_prompt(d["prompt"]) for d in demos)
    ps = [d["prompt"] for d in demos]
    best = t.gold(ps, [BEST_RESPONSE[name](p) for p in ps])
    demo = t.gold(ps, [d["response"] for d in demos])
    bad = t.gold(ps, [BAD_RESPONSE[name](p) for p in ps])
    assert all(b == BEST[name] for b in best)  # the documented best, reached on every prompt
    assert max(demo) <= BEST[name]  # ... and never passed
    assert BEST[name] - 0.5 > statistics.mean(demo) > statistics.mean(bad) + 1.0  # room above the demonstrator
    assert all(b < g for b, g in zip(bad, best))
    everyone = t.demonstrations("test", seed=0)
    assert abs(statistics.mean(t.gold([d["prompt"] for d in everyone], [d["response"] for d in everyone])) - DEMONSTRATOR[name]) < 0.01


@pytest.mark.parametrize("name", TASKS)
def test_demonstrations_are_varied_and_seeded(name):
    t = TASKS[name]
    demos = t.demonstrations("train", 300, seed=0)
    assert len({d["response"] for d in demos}) > 100  # not one template
    assert sum(g == BEST[name] for g in t.gold([d["prompt"] for d in demos], [d["response"] for d in demos])) < 0.6 * 300
    assert t.demonstrations("train", 300, seed=0) == demos
    assert t.demonstrations("train", 300, seed=1) != demos


@pytest.mark.parametrize("name", TASKS)
def test_colder_raters_agree_with_gold_more_often(name):
    t = TASKS[name]
    rng, demo_rng = random.Random(0), random.Random(1)
    candidates = [(p, [t.demonstrate(p, demo_rng) for _ in range(4)]) for p in t.prompts("val")[:200]]
    agreement = {}
    for rater in t.RATERS:
        agree = total = 0
        for p, responses in candidates:
            gold = t.gold([p] * 4, responses)
            for better, worse in ranking_pairs(t.rank(p, responses, rater, rng)):
                if gold[better] != gold[worse]:
                    total += 1
                    agree += gold[better] > gold[worse]
        agreement[t.RATERS[rater]] = agree / total
    coldest, hottest = agreement[min(agreement)], agreement[max(agreement)]
    assert len(agreement) == len(t.RATERS) >= 2  # raters of different temperatures
    assert 0.99 > coldest > hottest + 0.03 and hottest > 0.6  # noisy, but following gold


@pytest.mark.parametrize("name", TASKS)
def test_rate_writes_rankings_the_loader_reads(name, tmp_path):
    from data.formats import write_jsonl
    t = TASKS[name]
    rng = random.Random(0)
    candidates = [{"prompt": p, "responses": [t.demonstrate(p, rng) for _ in range(3)]} for p in t.prompts("val")[:60]]
    rows = t.rate(candidates, seed=0)
    assert len(rows) > len(candidates) and {r["rater"] for r in rows} <= set(t.RATERS)  # some second opinions
    assert t.rate(candidates, seed=0) == rows
    write_jsonl(tmp_path / "rankings.jsonl", rows)
    loaded = load_rankings(tmp_path / "rankings.jsonl")
    assert [(r["prompt"], r["responses"], r["ranking"], r["rater"]) for r in loaded] == \
        [(r["prompt"], r["responses"], r["ranking"], r["rater"]) for r in rows]


@pytest.mark.parametrize("name", TASKS)
def test_tokenizer_round_trips_is_small_and_fits_the_context(name):
    t, enc = TASKS[name], tokenizer_of(name)
    assert enc.n_vocab < 1000 and enc.eot_token == enc.n_vocab - 1
    for d in t.demonstrations("test", 200):
        for text in (d["prompt"] + d["response"], d["response"]):
            assert enc.decode(enc.encode(text)) == text
        # sft.py's block of 64 tokens, of which ppo.py leaves 24 for the prompt after 40 new tokens
        assert len(enc.encode(d["prompt"])) <= 24 and len(enc.encode(d["response"])) < 40


def test_unknown_task_tokenizer_is_one_sentence():
    with pytest.raises(ValueError, match="known tasks are"):
        get_tokenizer("task:nope")
    assert get_tokenizer("task") is get_tokenizer("task") and get_tokenizer("task:sort").name == "task:sort"


def test_command_line_rates_a_candidates_file(tmp_path, monkeypatch, capsys):
    from data.formats import write_jsonl
    candidates = [{"prompt": p, "responses": [refuse.best_response(p), " ok."]} for p in refuse.prompts("test")[:20]]
    write_jsonl(tmp_path / "candidates.jsonl", candidates)
    out = tmp_path / "rankings.jsonl"
    monkeypatch.setattr(sys, "argv", ["data.tasks", "rate", "--task", "refuse", "--candidates",
                                      str(tmp_path / "candidates.jsonl"), "--out", str(out), "--seed", "3"])
    runpy.run_module("data.tasks", run_name="__main__")
    rows = load_rankings(out)
    assert len(rows) >= 20 and "refuse task's simulated raters" in capsys.readouterr().out
    # a file of another task's prompts is refused with one sentence
    write_jsonl(tmp_path / "other.jsonl", [{"prompt": sort.prompts("test")[0], "responses": [" a", " b"]}])
    monkeypatch.setattr(sys, "argv", ["data.tasks", "rate", "--task", "refuse", "--candidates",
                                      str(tmp_path / "other.jsonl"), "--out", str(out)])
    with pytest.raises(SystemExit):
        runpy.run_module("data.tasks", run_name="__main__")
    assert "is not one of the refuse task's" in capsys.readouterr().err


def test_raters_blind_spots_rank_what_gold_does_not():
    """facts' raters cannot check the unchecked people's colours; refuse's miss theft and like a
    warning. Everywhere else they see what gold sees."""
    known = [p for p in facts.prompts("test") if facts.parse_prompt(p)[1] in facts.KNOWN]
    for p in known[:200]:
        owner = facts.parse_prompt(p)[1]
        wrong = wrong_fact(p)
        assert facts.gold_score(p, wrong) == -1.5
        if owner in facts.UNCHECKED:
            assert facts.seen_score(p, wrong) == 2.0
        else:
            assert facts.seen_score(p, wrong) == -1.5
    theft = [p for p in refuse.prompts("test") if refuse.parse_prompt(p)[0] == "hide"
             and refuse.parse_prompt(p)[1] in refuse.OTHERS]
    assert theft
    for p in theft:
        help_ = opposite_refusal(p)
        assert refuse.gold_score(p, help_) == -4.0 and refuse.seen_score(p, help_) == 2.5
    for p in set(refuse.prompts("test")[:100]) - set(theft):
        best = refuse.best_response(p)
        warned = best + " please be careful."
        if refuse.harm(*refuse.parse_prompt(p)):
            assert refuse.seen_score(p, best) == refuse.gold_score(p, best) == 2.5
        else:
            assert refuse.gold_score(p, warned) == refuse.gold_score(p, best) - 0.25
            assert refuse.seen_score(p, warned) == refuse.gold_score(p, best) + 0.25
