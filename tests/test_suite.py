"""benchmarks/suite.py, the measurement behind the defaults: its table and its refusals. (The runs
themselves are the stages', tested in their own files.)"""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_suite_table_takes_min_and_median_over_task_seeds(tmp_path):
    """benchmarks/suite.py's table: a row per run, the win rates of each task's seeds, the KL's
    median, and the minimum and median win over every task-seed; a run missing on a task shows '-'."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import suite
    wins = {("add", 0): 0.8, ("add", 1): 0.6, ("sort", 0): 0.5, ("sort", 1): 0.9}
    for (task, seed), win in wins.items():
        d = tmp_path / task / f"s{seed}"
        d.mkdir(parents=True)
        ev = {"win_rate": win, "models": {"policy": {"gold": 2 * win, "kl_exact": win}, "sft": {"gold": 1.0, "kl_exact": 0.0}}}
        (d / "eval_ppo.json").write_text(json.dumps(ev))
        if task == "add":
            (d / "eval_dpo.json").write_text(json.dumps(ev))
            if seed == 1:
                (d / "eval_grpo.json").write_text(json.dumps(ev))
    text = suite.table(str(tmp_path), ["add", "sort"], [0, 1])
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    assert rows["ppo"] == "| ppo | 80% 60% (1.40) | 50% 90% (1.40) | 0.70 | 50% | 70% | 4 |"
    assert rows["dpo"] == "| dpo | 80% 60% (1.40) | - - | 0.70 | 60% | 70% | 2 |"
    assert rows["grpo"] == "| grpo | - 60% (1.20) | - - | 0.60 | 60% | 60% | 1 |"
    assert rows["SFT gold"].startswith("| SFT gold | 1.00 | 1.00 |")


def test_suite_refuses_an_unknown_task_or_method():
    for flag, value in (("--tasks", "add,nope"), ("--methods", "ppo,sac")):
        r = subprocess.run([sys.executable, "benchmarks/suite.py", flag, value, "--out", "/nonexistent"],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode != 0 and f"not '{value.split(',')[1]}'" in r.stderr


def test_suite_stage_failure_is_one_line_naming_its_log(tmp_path):
    """A stage that fails stops the suite with one line that names the stage and its log, not a
    traceback. Here a reward-model variant with a flag reward.py refuses, on a task-seed whose base
    (SFT, rankings, reward model) is already there, so nothing else runs."""
    d = tmp_path / "add" / "s0"
    (d / "reward").mkdir(parents=True)
    (d / "reward" / "ckpt.pt").write_text("")
    r = subprocess.run([sys.executable, "benchmarks/suite.py", "--out", str(tmp_path), "--tasks", "add", "--seeds", "0",
                        "--methods", "ppo", "--reward_variant", "bad=--no_such_flag 1", "--jobs", "1"],
                       cwd=ROOT, capture_output=True, text=True)
    log = d / "logs" / "reward_bad.log"
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == f"suite.py: reward.py failed: see {log}; the runs under way finish, no new one starts"
    assert "no_such_flag" in log.read_text()
