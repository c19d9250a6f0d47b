"""label.py driven as a person would drive it: answers typed into its standard input, in a
subprocess, with an interruption and a resume; and --stats on a hand-made rankings file."""

import json
import os
import subprocess
import sys
import time

import pytest

from data import task
from data.formats import load_rankings, write_jsonl
from label import answered_prompts, parse_answer, print_stats, ranking_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = task.prompts("train")[:5]


def label(*args, input=""):
    return subprocess.run([sys.executable, "label.py", *map(str, args)], input=input, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def candidates(tmp_path):
    path = tmp_path / "candidates.jsonl"
    write_jsonl(path, [{"prompt": p, "responses": [f" a{i}", f" b{i}", f" c{i}"]} for i, p in enumerate(PROMPTS)])
    return path


def test_bad_answers_are_explained_and_asked_again(tmp_path, candidates):
    out = tmp_path / "rankings.jsonl"
    r = label("--candidates", candidates, "--out", out, "--rater", "ann",
              input="1 1 2\n4 1 2\nx 1 2\n1 2\n?\n2 1 3\n")  # then EOF, as Ctrl-D
    assert r.returncode == 0, r.stderr
    assert "response 1 is in the ranking twice" in r.stdout
    assert "there is no response 4; the responses are numbered 1-3" in r.stdout
    assert "'x' is not a response number" in r.stdout
    assert "response 3 missing" in r.stdout
    assert "1=4" in r.stdout and "skip" in r.stdout  # the help
    assert r.stdout.count("prompt 1/5") == 1 and "prompt 2/5" in r.stdout  # same question, then the next
    assert "saved 1 ranking(s)" in r.stdout
    rows = load_rankings(out)
    assert [(row["prompt"], row["ranking"], row["rater"]) for row in rows] == [(PROMPTS[0], [[1], [0], [2]], "ann")]
    assert json.loads(out.read_text())["ranking"] == [1, 0, 2]  # the file's compact form, 0-based


def test_tie_skip_quit_and_resume_per_rater(tmp_path, candidates):
    out = tmp_path / "rankings.jsonl"
    r = label("--candidates", candidates, "--out", out, "--rater", "ann", input="skip\n2=3 1\nq\n3 2 1\n")
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text()) == {"prompt": PROMPTS[1], "responses": [" a1", " b1", " c1"],
                                           "ranking": [[1, 2], 0], "rater": "ann"}
    assert "saved 1 ranking(s) to" in r.stdout and "skipped 1" in r.stdout
    # Across sessions a skipped prompt is asked again; the answered one is not.
    r = label("--candidates", candidates, "--out", out, "--rater", "ann", input="1 2 3\n")
    assert "1 of 5 prompts already ranked by ann" in r.stdout
    assert [row["prompt"] for row in load_rankings(out)] == [PROMPTS[1], PROMPTS[0]]
    # Each rater resumes from their own answers.
    assert answered_prompts(str(out), "ann") == {PROMPTS[0], PROMPTS[1]}
    assert answered_prompts(str(out), "bob") == set()


def test_killed_mid_session_loses_nothing_and_resumes_after_last_answer(tmp_path, candidates):
    out = tmp_path / "rankings.jsonl"
    proc = subprocess.Popen([sys.executable, "label.py", "--candidates", str(candidates), "--out", str(out),
                             "--rater", "ann"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    proc.stdin.write("2 1 3\n1 2 3\n")
    proc.stdin.flush()  # stdin stays open: the third question is waiting for an answer
    deadline = time.time() + 30
    while not (out.exists() and len(out.read_text().splitlines()) == 2) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.kill()  # no chance to clean up, like a closed terminal or a crash
    proc.wait()
    proc.stdin.close()
    assert [row["prompt"] for row in load_rankings(out)] == PROMPTS[:2]

    r = label("--candidates", candidates, "--out", out, "--rater", "ann", input="3 1 2\n1 2 3\n1 2 3\n")
    assert "2 of 5 prompts already ranked by ann" in r.stdout
    assert "prompt 3/5" in r.stdout and "prompt 1/5" not in r.stdout and "prompt 2/5" not in r.stdout
    rows = load_rankings(out)
    assert [row["prompt"] for row in rows] == PROMPTS
    assert rows[2]["ranking"] == [[2], [0], [1]]


def test_init_samples_from_a_checkpoint(tmp_path):
    import torch
    from common import save_checkpoint
    from data.tokenizer import get_tokenizer
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    config = GPTConfig(block_size=48, vocab_size=get_tokenizer("task").n_vocab, n_layer=1, n_head=2,
                       n_embd=16, tokenizer="task")
    save_checkpoint(str(tmp_path / "ckpt.pt"), GPT(config), kind="policy", config=config, step=0)
    out = tmp_path / "rankings.jsonl"
    r = label("--init", tmp_path / "ckpt.pt", "--prompts", "task", "--n", 3, "--k", 3, "--batch", 2,
              "--max_new_tokens", 6, "--device", "cpu", "--out", out, "--rater", "ann", input="3 2 1\n1 2=3\n")
    assert r.returncode == 0, r.stderr
    rows = load_rankings(out)
    assert [row["prompt"] for row in rows] == PROMPTS[:2]
    assert all(len(row["responses"]) == 3 for row in rows)
    assert rows[1]["ranking"] == [[0], [1, 2]]


def test_parse_answer():
    assert parse_answer("2 1=4 3", 4) == [[1], [0, 3], [2]]
    assert parse_answer("2,1,3", 3) == [[1], [0], [2]]
    for bad in ("1 2", "1 2 3 3", "0 1 2", "1 2 3=", "a b c"):
        with pytest.raises(ValueError):
            parse_answer(bad, 3)


def stats_rows():
    # P1 ranked by ann, ben and cat; P2 by ann (with a tie) and ben; P3 by ann alone.
    return [
        {"prompt": "P1", "responses": ["x", "y", "z"], "ranking": [0, 1, 2], "rater": "ann"},
        {"prompt": "P1", "responses": ["x", "y", "z"], "ranking": [1, 0, 2], "rater": "ben"},
        {"prompt": "P2", "responses": ["u", "v", "w"], "ranking": [[0, 1], 2], "rater": "ann"},
        {"prompt": "P2", "responses": ["u", "v", "w"], "ranking": [2, 0, 1], "rater": "ben"},
        {"prompt": "P1", "responses": ["x", "y", "z"], "ranking": [0, 1, 2], "rater": "cat"},
        {"prompt": "P3", "responses": ["p", "q"], "ranking": [1, 0], "rater": "ann"},
    ]


def test_stats_by_hand(tmp_path, capsys):
    path = tmp_path / "rankings.jsonl"
    write_jsonl(path, stats_rows())
    s = ranking_stats(load_rankings(path))
    assert (s["prompts"], s["rankings"], s["pairs"], s["multi_rated_prompts"]) == (3, 6, 15, 2)
    # ann-ben: P1 agree on (0,2), (1,2), not (0,1); P2 (0,1) tied by ann, (0,2) and (1,2) opposite
    assert s["agreement"]["ann-ben"] == {"agree": 2, "pairs": 5, "fraction": 2 / 5}
    assert s["agreement"]["ann-cat"]["fraction"] == 1.0
    assert s["agreement"]["ben-cat"]["fraction"] == 2 / 3
    assert s["agreement_overall"] == pytest.approx(7 / 11)
    # first groups {0}, {1}, {0,1}, {2}, {0}, {1}; position 2 exists in 5 rankings
    assert s["first_by_position"] == {0: 3 / 6, 1: 3 / 6, 2: 1 / 5}

    r = label("--stats", path, "--json", "true")
    assert json.loads(r.stdout)["agreement_overall"] == pytest.approx(7 / 11)
    print_stats(str(path), s)
    table = capsys.readouterr().out
    assert "ann-ben" in table and "40.0%" in table and "63.6%" in table and "[3] 20.0%" in table
