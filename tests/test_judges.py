"""Judges, Python functions fn(prompts, responses) -> [float] named FILE.py:fn: rate.py ranks
candidates with them (Plackett-Luce raters), eval.py scores checkpoints with them, and the
built-in task's simulated raters are one of them."""

import json
import math
import os
import random
import subprocess
import sys

import pytest

from judges import JudgeError, load_judge, plackett_luce, rank
from common import ConfigError
from data import task
from data.formats import load_rankings, write_jsonl
from test_stages import ROOT, one_sentence, run, tiny_ckpts  # noqa: F401  (a fixture)

JUDGES = '''
import math


def length(prompts, responses):
    return [float(len(r)) for r in responses]


def boom(prompts, responses):
    if any("boom" in r for r in responses):
        raise ValueError("cannot judge this")
    return [0.0] * len(responses)


def too_few(prompts, responses):
    return [0.0] * (len(responses) - 1)


def words(prompts, responses):
    return ["good" if "yes" in r else 0.0 for r in responses]


def nan(prompts, responses):
    return [math.nan if "yes" in r else 0.0 for r in responses]
'''


def script(*args, check=True):
    """python *args from the repo root, as a user runs it."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture
def judges(tmp_path):
    path = tmp_path / "judges.py"
    path.write_text(JUDGES)
    candidates = [{"prompt": "p1", "responses": ["bb", "a", "dddd", "cc"]},
                  {"prompt": "p2", "responses": ["x", "yes boom"]}]
    write_jsonl(tmp_path / "candidates.jsonl", candidates)
    return path


# ----------------------------------------------------------------------------- loading and calling

def test_load_judge_names_what_is_wrong(judges):
    assert load_judge(f"{judges}:length")(["p"], ["abc"]) == [3.0]
    assert issubclass(JudgeError, ConfigError)  # so run_main prints it as one sentence
    for spec, why in [(str(judges), "expected FILE.py:function"), (f"{judges.parent / 'gone.py'}:length", "no such file"),
                      (f"{judges}:missing", "has no function missing")]:
        with pytest.raises(JudgeError, match=why) as e:
            load_judge(spec)
        assert spec in str(e.value)


@pytest.mark.parametrize("fn, why", [("boom", "ValueError: cannot judge this on the response 'yes boom'"),
                                     ("too_few", "returned 1 scores for 2 responses"),
                                     ("words", "returned 'good' for the response 'yes boom'"),
                                     ("nan", "returned nan for the response 'yes boom'")])
def test_a_judge_that_answers_wrongly_stops_with_one_sentence(judges, tmp_path, fn, why):
    proc = script("rate.py", "--candidates", tmp_path / "candidates.jsonl", "--judge", f"{judges}:{fn}",
                  "--batch_size", 2, "--out", tmp_path / "rankings.jsonl", check=False)
    last = one_sentence(proc)
    assert f"judge {judges}:{fn}" in last and why in last, last
    assert not (tmp_path / "rankings.jsonl").exists()


# ----------------------------------------------------------------------------- ranking

def test_temperature_zero_sorts_by_score_and_ties_equal_scores():
    assert rank(["a", "b", "c", "d"], [0.5, 2.0, 0.5, -1.0], 0, random.Random(0)) == [[1], [0, 2], [3]]
    assert rank(["a", "b"], [1.0, 1.0], 0, random.Random(0)) == [[0, 1]]


def test_plackett_luce_puts_the_best_first_as_often_as_the_model_says():
    rng, n = random.Random(0), 4000
    scores = [1.0, 0.0, 0.0, 0.0]
    for temperature in (0.2, 1.0, 5.0):
        first = sum(plackett_luce(scores, temperature, rng)[0] == 0 for _ in range(n)) / n
        expected = math.exp(1 / temperature) / (math.exp(1 / temperature) + 3)  # 0.98, 0.48, 0.30
        assert first == pytest.approx(expected, abs=0.03), temperature
    # above temperature 0 identical responses are tied, different ones with equal scores are not
    groups = rank(["a", "b", "a"], [0.0, 0.0, 0.0], 1.0, rng)
    assert sorted(map(sorted, groups)) == [[0, 2], [1]]


def test_rate_py_writes_rankings_that_load(judges, tmp_path):
    out = tmp_path / "rankings.jsonl"
    proc = script("rate.py", "--candidates", tmp_path / "candidates.jsonl", "--judge", f"{judges}:length",
                  "--raters", 3, "--out", out)
    assert "2 prompts (0 skipped: fewer than 2 distinct responses), 6 responses" in proc.stdout and "6 rankings by 3 rater(s)" in proc.stdout, proc.stdout
    rows = load_rankings(str(out))
    assert [r["rater"] for r in rows] == ["length-1", "length-2", "length-3"] * 2  # N rows per prompt, own names
    assert all(r["ranking"] == [[2], [0, 3], [1]] for r in rows[:3])  # by length, "bb" and "cc" tied
    assert rows[3]["ranking"] == [[1], [0]]


def test_raters_each_have_their_own_noise_and_the_seed_repeats_them(judges, tmp_path):
    candidates = [{"prompt": f"p{i}", "responses": ["a", "bb", "ccc", "dddd"]} for i in range(50)]
    write_jsonl(tmp_path / "many.jsonl", candidates)
    rankings = []
    for i in range(2):
        script("rate.py", "--candidates", tmp_path / "many.jsonl", "--judge", f"{judges}:length", "--temperature", 2,
               "--raters", 2, "--out", tmp_path / f"r{i}.jsonl")
        rankings.append([r["ranking"] for r in load_rankings(str(tmp_path / f"r{i}.jsonl"))])
    assert rankings[0] == rankings[1]  # same seed, same rankings
    assert rankings[0][0::2] != rankings[0][1::2]  # the two raters disagree somewhere


# ----------------------------------------------------------------------------- the built-in task's raters

def test_task_raters_are_plackett_luce_over_the_gold_judge(tmp_path):
    rng = random.Random(0)
    prompt = task.prompts("val")[0]
    responses = [task.demonstrate(prompt, rng) for _ in range(4)]
    gold = task.gold([prompt] * 4, responses)
    assert gold == [task.gold_score(prompt, r) for r in responses]
    assert task.rank(prompt, responses, "cat", random.Random(7)) == rank(responses, gold, task.RATERS["cat"], random.Random(7))
    # `python -m data.tasks rate --task add` writes the rankings format as before, and rate.py can rank by gold too
    write_jsonl(tmp_path / "candidates.jsonl", [{"prompt": prompt, "responses": responses}])
    script("-m", "data.tasks", "rate", "--task", "add", "--candidates", tmp_path / "candidates.jsonl", "--out", tmp_path / "task.jsonl")
    row = json.loads(open(tmp_path / "task.jsonl").readline())
    assert set(row) == {"prompt", "responses", "ranking", "rater"} and row["rater"] in task.RATERS
    script("rate.py", "--candidates", tmp_path / "candidates.jsonl", "--judge", "data/task.py:gold",
           "--out", tmp_path / "gold.jsonl")
    ranking = load_rankings(str(tmp_path / "gold.jsonl"))[0]["ranking"]
    assert [gold[g[0]] for g in ranking] == sorted(set(gold), reverse=True)


# ----------------------------------------------------------------------------- eval.py --judge

SCRIPTED = '''
import os
COUNTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls")


def first_model(prompts, responses):
    """1 for every response of the first model eval.py scores (--init), 0 for the second's."""
    calls = int(open(COUNTER).read()) if os.path.exists(COUNTER) else 0
    open(COUNTER, "w").write(str(calls + 1))
    return [1.0 if calls == 0 else 0.0] * len(responses)


def same(prompts, responses):
    return [1.0] * len(responses)
'''


def test_eval_reports_the_judge_and_the_win_rate_under_it(tiny_ckpts, tmp_path):
    judge = tmp_path / "judge.py"
    judge.write_text(SCRIPTED)
    policy, copy = tiny_ckpts / "policy.pt", tmp_path / "copy.pt"
    copy.write_bytes(policy.read_bytes())  # the same weights under another name, sampled with another seed
    args = ["--init", policy, "--compare", copy, "--n", 8, "--batch_size", 8, "--max_new_tokens", 8, "--demos", ""]
    # prompts that are not the task's: no gold, but the judge decides
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"tell me a joke about {x}\nbot:"} for x in "abcdefgh"])
    run("eval.py", *args, "--prompts", tmp_path / "prompts.jsonl", "--judge", f"{judge}:first_model",
        "--out", tmp_path / "eval.json")
    results = json.load(open(tmp_path / "eval.json"))
    assert results["judge_win_rate"] == 1.0 and "win_rate" not in results
    assert [m["judge"] for m in results["models"].values()] == [1.0, 0.0] and "gold" not in results["models"][str(policy)]
    # the task's prompts: gold and the judge side by side; a judge that scores alike ties every prompt
    run("eval.py", *args, "--judge", f"{judge}:same", "--out", tmp_path / "task.json")
    results = json.load(open(tmp_path / "task.json"))
    assert results["judge_win_rate"] == 0.5 and "win_rate" in results and "gold" in results["examples"][0]
