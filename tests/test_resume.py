"""--resume for every training stage: a run killed with SIGKILL partway and started again with
--resume true ends with the same weights as a run that was never interrupted (bitwise: on CPU
every step is deterministic), and its metrics.jsonl holds the same rows, each step once."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT
from test_stages import SFT_ARGS, run, tiny_ckpts, write_rankings  # noqa: F401  (a fixture)
from data import task

TIMING = ("time", "tok/s", "time/generation", "time/scoring", "time/training")


def rows_without_timing(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def killed_once(script, args, out):
    """Start a stage, SIGKILL it as soon as its first checkpoint is on disk, then run the same
    command with --resume true. Returns the step the checkpoint was at when the run was killed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, script, "--device", "cpu", *map(str, args), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt, deadline = os.path.join(out, "ckpt.pt"), time.time() + 120
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["step"]
    run(script, *args, "--resume", "true", "--out", out)
    return step


def same_run(a, b, key="model", extra=()):
    ca, cb = (torch.load(os.path.join(x, "ckpt.pt"), map_location="cpu", weights_only=True) for x in (a, b))
    assert ca["step"] == cb["step"]
    for name in [key, *extra]:
        sa, sb = (c[name] if name in c else c["resume"][name] for c in (ca, cb))
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}: {k} differs after resuming"
    assert rows_without_timing(a) == rows_without_timing(b)


def test_sft_resumes_after_kill(tmp_path):
    args = [*SFT_ARGS, "--max_steps", 40, "--eval_every", 10, "--save_every", 5]
    run("sft.py", *args, "--out", tmp_path / "full")
    step = killed_once("sft.py", args, tmp_path / "part")
    assert 0 < step < 40
    same_run(tmp_path / "full", tmp_path / "part")


def test_reward_resumes_after_kill_at_an_epoch_boundary(tmp_path):
    write_rankings(tmp_path / "rankings.jsonl", task.prompts("train")[:40])
    write_rankings(tmp_path / "val.jsonl", task.prompts("val")[:8], seed=1)
    torch.manual_seed(0)
    sft = tmp_path / "sft"
    run("sft.py", *SFT_ARGS, "--out", sft)
    # 40 rankings, batch 8: 5 steps an epoch; a checkpoint at every epoch's end
    args = ["--data", tmp_path / "rankings.jsonl", "--val_data", tmp_path / "val.jsonl", "--init", sft / "ckpt.pt",
            "--batch_size", 8, "--epochs", 8, "--eval_every", 5, "--save_every", 5, "--normalize_prompts", 8]
    run("reward.py", *args, "--out", tmp_path / "full")
    step = killed_once("reward.py", args, tmp_path / "part")
    assert step % 5 == 0 and step < 40  # killed at an epoch boundary, with epochs still to go
    same_run(tmp_path / "full", tmp_path / "part")


def test_ppo_resumes_after_kill(tiny_ckpts, tmp_path):
    args = ["--init", tiny_ckpts / "policy.pt", "--reward", tiny_ckpts / "reward.pt", "--updates", 16,
            "--batch_size", 8, "--mini_batch_size", 4, "--max_new_tokens", 8, "--save_every", 2, "--eval_every", 3,
            "--eval_n", 8, "--adaptive_kl", "true", "--log_samples_every", 2]
    run("ppo.py", *args, "--out", tmp_path / "full")
    step = killed_once("ppo.py", args, tmp_path / "part")
    assert 0 < step < 16
    same_run(tmp_path / "full", tmp_path / "part", extra=("value",))
    full, part = (torch.load(tmp_path / x / "ckpt.pt", weights_only=True) for x in ("full", "part"))
    assert full["resume"]["kl_coef"] == part["resume"]["kl_coef"] != 0.5  # the adaptive KL coefficient came back too
    for name in ("full", "part"):  # samples.jsonl, like metrics.jsonl, has each step once
        steps = [json.loads(line)["step"] for line in open(tmp_path / name / "samples.jsonl")]
        assert steps == sorted(steps) and len(set(steps)) == 8


def test_resume_refuses_other_settings(tmp_path):
    args = [*SFT_ARGS, "--save_every", 1]
    run("sft.py", *args, "--out", tmp_path / "sft")
    proc = run("sft.py", *args, "--lr", 0.5, "--resume", "true", "--out", tmp_path / "sft", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "--lr" in last and "0.5" in last and "--max_steps" in last, last
    # the step count may change: more steps continue the run
    run("sft.py", *args, "--max_steps", 5, "--resume", "true", "--out", tmp_path / "sft")
    assert torch.load(tmp_path / "sft" / "ckpt.pt", weights_only=True)["step"] == 5
