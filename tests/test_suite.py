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
