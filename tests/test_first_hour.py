"""A newcomer's first hour: every user error ends in one sentence that names the flag and what to
do, never a traceback, and nothing already written is lost. Most cases run the stage's main in
this process (as `python X.py ...` would, through run_main); a few run the script itself."""

import importlib
import shutil
import subprocess
import sys

import pytest
import torch

import common
from conftest import ROOT
from data import task
from data.formats import write_jsonl
from test_stages import SFT_ARGS, loads_safely, one_sentence, run, tiny_ckpts  # noqa: F401  (a fixture)

SCRIPTS = ["sft", "reward", "ppo", "dpo", "eval", "sample", "label", "rate", "plot"]


def refusal(capsys, monkeypatch, script, *args):
    """Run script.main with these arguments in this process; return the one line it printed
    before exiting with status 1."""
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        common.run_main(module.main)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0(capsys, monkeypatch, script):
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--help"])
    with pytest.raises(SystemExit) as e:
        module.main()
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("script,args,words", [
    ("sft", ["--batch_size", 0], ["--batch_size", "1 or more"]),
    ("sft", ["--batch_size", -4], ["--batch_size", "1 or more"]),
    ("dpo", ["--batch_size", 0], ["--batch_size", "1 or more"]),
    ("ppo", ["--batch_size", -4], ["--batch_size", "1 or more"]),
    ("ppo", ["--mini_batch_size", 8, "--batch_size", 4], ["--batch_size 4", "multiple of --mini_batch_size 8"]),
    ("ppo", ["--advantage", "grpo", "--group_size", 1], ["--group_size", "2 or more"]),
    ("ppo", ["--advantage", "ppo"], ["--advantage ppo", "gae, grpo"]),
    ("reward", ["--ensemble", 0], ["--ensemble", "1 or more"]),
    ("eval", ["--n", -3], ["--n", "0 (every prompt) or more"]),
    ("sample", ["--k", 0], ["--k", "1 or more"]),
    ("sample", ["--k", 1, "--out", "x.jsonl"], ["--k 2 or more"]),
    ("sft", ["--max_step", 5], ["unknown flag --max_step", "did you mean --max_steps?"]),
    ("ppo", ["--kl-coeff", 0.1], ["unknown flag --kl-coeff", "did you mean --kl-coef?"]),
    ("sft", ["--device", "tpu"], ["--device tpu", "use cpu, cuda"]),
    ("sft", ["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], ["--device cuda"]),
    ("ppo", ["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], ["--device cuda"]),
    ("eval", ["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], ["--device cuda"]),
])
def test_bad_flags_are_one_sentence(capsys, monkeypatch, tmp_path, script, args, words):
    line = refusal(capsys, monkeypatch, script, *args, *(["--out", tmp_path / "out"] if script != "eval" else []))
    assert all(w in line for w in words), line


def test_a_run_is_never_overwritten_without_resume_or_overwrite(tmp_path):
    out = tmp_path / "sft"
    run("sft.py", *SFT_ARGS, "--out", out)
    before = {name: (out / name).read_bytes() for name in ("ckpt.pt", "metrics.jsonl")}
    proc = run("sft.py", *SFT_ARGS, "--lr", 0.01, "--out", out, check=False)
    line = one_sentence(proc)
    assert "--resume true" in line and "--overwrite true" in line and str(out) in line, line
    assert {name: (out / name).read_bytes() for name in before} == before  # byte for byte
    run("sft.py", *SFT_ARGS, "--lr", 0.01, "--out", out, "--overwrite", "true")
    assert loads_safely(out / "ckpt.pt")["config"]["lr"] == 0.01


def test_resume_from_a_moved_folder_and_every_differing_flag_named(tmp_path):
    args = [*SFT_ARGS, "--save_every", 1]
    run("sft.py", *args, "--out", tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")  # --out is where the run is, not part of what it is
    proc = run("sft.py", *args, "--lr", 0.5, "--warmup_steps", 7, "--resume", "true", "--out", tmp_path / "b", check=False)
    line = one_sentence(proc)
    assert "--lr" in line and "--warmup_steps" in line and "--out" not in line, line
    run("sft.py", *args, "--max_steps", 4, "--resume", "true", "--out", tmp_path / "b")
    assert loads_safely(tmp_path / "b" / "ckpt.pt")["step"] == 4


def test_a_reward_model_as_init_names_the_flag_and_the_kind(capsys, monkeypatch, tiny_ckpts, tmp_path):
    line = refusal(capsys, monkeypatch, "ppo", "--init", tiny_ckpts / "reward.pt", "--reward", tiny_ckpts / "reward.pt",
                   "--out", tmp_path / "ppo", "--device", "cpu")
    assert "given as --init" in line and "is a reward checkpoint" in line and "--init takes a policy checkpoint" in line
    assert "--reward" in line, line  # where that checkpoint goes instead


def test_skip_bad_lines_leaving_one_row_says_why(capsys, monkeypatch, tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text('{"prompt": "mia: what is 1 plus 2?\\nbot:", "response": " 3"}\nnot json\n')
    line = refusal(capsys, monkeypatch, "sft", "--data", path, "--skip_bad_lines", "true", "--out", tmp_path / "sft",
                   "--device", "cpu", "--n_layer", 1, "--n_embd", 16, "--n_head", 2)
    assert "no demonstrations to train on" in line and "held out for validation" in line and "--val_data" in line, line
    assert "longer than" not in line, line


def test_rate_and_label_count_prompts_with_fewer_than_two_distinct_responses(tmp_path):
    prompts = task.prompts("train")[:3]
    write_jsonl(tmp_path / "cands.jsonl", [{"prompt": prompts[0], "responses": [" a", " b"]},
                                           {"prompt": prompts[1], "responses": [" a"]},
                                           {"prompt": prompts[2], "responses": [" c", " c"]}])
    proc = subprocess.run([sys.executable, "rate.py", "--candidates", tmp_path / "cands.jsonl", "--judge",
                           "data/task.py:gold", "--out", tmp_path / "rankings.jsonl"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "1 prompts (2 skipped: fewer than 2 distinct responses)" in proc.stdout, proc.stdout
    assert len(open(tmp_path / "rankings.jsonl").readlines()) == 1
    proc = subprocess.run([sys.executable, "label.py", "--candidates", tmp_path / "cands.jsonl", "--out",
                           tmp_path / "mine.jsonl", "--rater", "me"], cwd=ROOT, input="quit\n", capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "2 of 3 prompts skipped: fewer than 2 distinct responses" in proc.stdout, proc.stdout
    write_jsonl(tmp_path / "ones.jsonl", [{"prompt": prompts[1], "responses": [" a"]}])
    proc = subprocess.run([sys.executable, "rate.py", "--candidates", tmp_path / "ones.jsonl", "--judge",
                           "data/task.py:gold", "--out", tmp_path / "none.jsonl"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "no prompt has 2 or more distinct responses" in proc.stderr, proc.stderr
    assert not (tmp_path / "none.jsonl").exists()
