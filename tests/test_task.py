"""The built-in task: disjoint splits, the gold judge, the noisy demonstrator, the simulated raters."""

import os
import random
import re
import subprocess
import sys

import torch

import common
import sft
from conftest import ROOT
from data import task
from data.formats import ranking_pairs
from data.tokenizer import get_tokenizer
from model import GPT, GPTConfig


def test_splits_are_disjoint_and_cover_every_prompt():
    splits = {s: set(task.prompts(s)) for s in ("train", "val", "test")}
    assert not (splits["train"] & splits["val"]) and not (splits["train"] & splits["test"]) and not (splits["val"] & splits["test"])
    assert sum(map(len, splits.values())) == len(task.NAMES) * len(task.NUMBERS) ** 2 * len(task.TEMPLATES)
    assert len(splits["test"]) >= 400  # enough for the win rate on 400 test prompts


def test_gold_judge_by_hand():
    p = "mia: can you add 3 and 4?\nbot:"
    assert task.gold_score(p, " hi mia! 3 plus 4 is 7. glad to help!") == 3.0  # the best there is
    assert task.gold_score(p, " hi mia! 3 plus 4 is 8. glad to help!") == 0.0  # wrong sum: 2.0 -> -1.0
    assert task.gold_score(p, " hi bob! 3 plus 4 is 7.") == 1.5  # someone else's name
    assert task.gold_score(p, " 3 plus 4 is 7. ugh, that was easy.") == 1.0  # rude
    assert task.gold_score(p, " glad to help!") == -1.0  # polite but no answer
    long = " hi mia! um, let me think. this is a hard one. 3 plus 4 is 7. glad to help!"  # 19 words
    assert abs(task.gold_score(p, long) - (3.0 - 0.9)) < 1e-9


def test_demonstrator_is_noisy_so_sft_has_room_to_improve():
    demos = task.demonstrations("train", 2000)
    gold = [task.gold_score(d["prompt"], d["response"]) for d in demos]
    assert sum(g == 3.0 for g in gold) / len(gold) < 0.1  # few demonstrations are the best response
    assert 0.5 < sum(gold) / len(gold) < 2.5


def test_simulated_raters_write_valid_rankings_that_follow_gold():
    rng = random.Random(0)
    candidates = [{"prompt": p, "responses": [task.demonstrate(p, rng) for _ in range(4)]} for p in task.prompts("val")[:300]]
    rows = task.rate(candidates, seed=0)
    assert len(rows) > len(candidates)  # some prompts get a second rater
    agree = total = 0
    for row in rows:
        assert sorted(i for group in row["ranking"] for i in group) == [0, 1, 2, 3] and row["rater"] in task.RATERS
        gold = [task.gold_score(row["prompt"], r) for r in row["responses"]]
        for better, worse in ranking_pairs(row["ranking"]):
            if gold[better] != gold[worse]:
                total += 1
                agree += gold[better] > gold[worse]
    assert 0.7 < agree / total < 0.99  # mostly right, but noisy


def test_task_tokenizer_round_trips_and_is_small():
    enc = get_tokenizer("task")
    assert enc.n_vocab < 600
    for d in task.demonstrations("test", 50):
        text = d["prompt"] + d["response"]
        assert enc.decode(enc.encode(text)) == text
        assert len(enc.encode(text)) < 48


def test_reward_probe_changes_one_thing_each_and_gold_prefers_the_best(tmp_path):
    """benchmarks/reward_probe.py: each change costs gold on every prompt (so the order it checks the
    reward model against is gold's), and it prints a row per change for a reward model."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import reward_probe

    rows = reward_probe.pairs(50)
    for prompt, best, changed in rows:
        assert task.gold_score(prompt, best) == 3.0
        assert set(changed) == set(reward_probe.CHANGES) and len(set(changed.values())) == len(changed)
        assert all(task.gold_score(prompt, r) < 3.0 for r in changed.values()), changed
    # the ceiling's polish: every filler and closing out, "glad to help!" in, greeting and sum kept
    for r in (" hi bob! um, let me think. this is a hard one. 3 plus 4 is 8. glad to help! have a great day!",
              " hi bob! 3 plus 4 is 8. ugh, that was easy.", " hi bob! um, let me think. 3 plus 4 is 8."):
        assert reward_probe.polished(r) == " hi bob! 3 plus 4 is 8. glad to help!"
    def probe(tokenizer):
        """reward_probe.py on 20 prompts, with a random tiny reward model of that tokenizer."""
        torch.manual_seed(0)
        config = GPTConfig(block_size=64, vocab_size=get_tokenizer(tokenizer).n_vocab, n_layer=1, n_head=2,
                           n_embd=32, head="scalar", tokenizer=tokenizer)
        path = str(tmp_path / f"{tokenizer}.pt")
        common.save_checkpoint(path, GPT(config), kind="reward", config=sft.Config(), step=0)
        return subprocess.run([sys.executable, "benchmarks/reward_probe.py", path, "--n", "20"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    proc = probe("task")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for change in reward_probe.CHANGES:
        assert re.search(rf"^\| {re.escape(change)} \(\+\d\.\d\) \| \d+% \([+-]\d\.\d\d\) \|$", proc.stdout, re.M), proc.stdout
    assert re.search(r"three seeds: (\d+\.\d%, ){2}\d+\.\d%$", proc.stdout, re.M), proc.stdout
    # a reward model of another task of the suite is refused in one line, not scored on foreign text
    proc = probe("task:sort")
    assert proc.returncode != 0 and "not of the built-in task" in proc.stderr.strip().splitlines()[-1], proc.stderr
