"""sft.py, reward.py and ppo.py run as a user runs them (one process and torchrun with two), on tiny
models, and their refusals of bad input (the losses they use are checked by hand in test_losses.py)."""

import json
import math
import os
import random
import socket
import subprocess
import sys

import pytest
import torch

import common
import sft
from data import task
from data.formats import write_jsonl
from data.tokenizer import get_tokenizer
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120


# ----------------------------------------------------------------------------- running the stages

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(script, *args, nproc=1, check=True):
    """Run a stage as a user would: `python script` or torchrun with nproc processes, on CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)  # the stages on CPU use the PyTorch references
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    cmd = launch + [script, "--device", "cpu", *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def loads_safely(path):
    assert os.path.exists(path), path
    return torch.load(path, map_location="cpu", weights_only=True)


def tiny_config(head="lm"):
    return GPTConfig(block_size=64, vocab_size=get_tokenizer("task").n_vocab, n_layer=1, n_head=2,
                     n_embd=32, head=head, tokenizer="task")


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    """A random policy and reward model of the task's tokenizer, saved as the stages save them."""
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    common.save_checkpoint(str(d / "policy.pt"), GPT(tiny_config()), kind="policy", config=sft.Config(), step=0)
    common.save_checkpoint(str(d / "reward.pt"), GPT(tiny_config("scalar")), kind="reward", config=sft.Config(), step=0)
    return d


DESIGN_METRICS = ["objective/score", "objective/kl_k1", "objective/kl_exact", "objective/entropy", "objective/rlhf_reward",
                  "ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl", "ppo/clipfrac", "ppo/ratio_mean",
                  "val/explained_var", "val/clipfrac", "rollout/resp_len", "rollout/eos_rate", "kl_coef", "tok/s",
                  "time/generation", "time/scoring", "time/training"]
PPO_ARGS = ["--updates", 2, "--batch_size", 8, "--mini_batch_size", 4, "--max_new_tokens", 8]


def test_ppo_first_ratio_is_exactly_one(tiny_ckpts, tmp_path):
    out = tmp_path / "ppo"
    run("ppo.py", "--init", tiny_ckpts / "policy.pt", "--reward", tiny_ckpts / "reward.pt", *PPO_ARGS,
        "--ppo_epochs", 2, "--out", out)
    rows = [r for r in metrics(out) if "ppo/policy_loss" in r]  # the training rows (eval/* rows apart)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["ppo/first_ratio_error"] == 0.0
    # the learning rate decays by default: cosine from 1e-4 to a tenth of it at the last update
    assert [r["lr"] for r in rows] == pytest.approx([1e-4 * (0.1 + 0.9 * 0.5), 1e-5])
    for row in rows:
        missing = [k for k in DESIGN_METRICS if k not in row]
        assert not missing, f"metrics not logged: {missing}"
        assert all(math.isfinite(row[k]) for k in DESIGN_METRICS)
    policy, value = loads_safely(out / "ckpt.pt"), loads_safely(out / "value.pt")
    assert policy["kind"] == "policy" and value["kind"] == "value" and policy["step"] == 2
    assert common.load_model(str(out / "ckpt.pt"), kind="policy").config.head == "lm"
    assert value["model_config"]["head"] == "scalar"


SFT_ARGS = ["--n_layer", 1, "--n_embd", 32, "--n_head", 2, "--max_steps", 3, "--batch_size", 8,
            "--micro_batch_size", 4, "--n_demos", 64, "--eval_every", 3]


@pytest.fixture(scope="module")
def sft_two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft2")
    run("sft.py", *SFT_ARGS, "--out", out, nproc=2)
    return out


def write_rankings(path, prompts, k=3, seed=0):
    rng = random.Random(seed)
    candidates = [{"prompt": p, "responses": [task.demonstrate(p, rng) for _ in range(k)]} for p in prompts]
    write_jsonl(str(path), task.rate(candidates, seed=seed))


def test_reward_and_a_critic_free_estimator_under_torchrun(sft_two_processes, tmp_path):
    train = task.prompts("train")
    write_rankings(tmp_path / "rankings.jsonl", train[:24])
    write_rankings(tmp_path / "val.jsonl", train[24:32], seed=1)
    run("reward.py", "--data", tmp_path / "rankings.jsonl", "--val_data", tmp_path / "val.jsonl", "--init",
        sft_two_processes / "ckpt.pt", "--batch_size", 8, "--micro_batch_size", 2, "--epochs", 1, "--out", tmp_path / "rm",
        nproc=2)
    assert loads_safely(tmp_path / "rm" / "ckpt.pt")["kind"] == "reward"
    run("ppo.py", "--init", sft_two_processes / "ckpt.pt", "--reward", tmp_path / "rm" / "ckpt.pt", *PPO_ARGS,
        "--advantage", "grpo", "--group_size", 2, "--out", tmp_path / "grpo", nproc=2)
    rows = [r for r in metrics(tmp_path / "grpo") if "ppo/policy_loss" in r]
    assert len(rows) == 2 and rows[0]["ppo/first_ratio_error"] == 0.0 and "val/explained_var" not in rows[0]
    assert not (tmp_path / "grpo" / "value.pt").exists()  # no value model


def test_reward_without_data_ranks_sft_samples_of_the_built_in_task(sft_two_processes, tmp_path):
    # no --data: sample 4 responses per task prompt from --init and let the simulated raters rank them
    run("reward.py", "--init", sft_two_processes / "ckpt.pt", "--task-prompts", 40, "--val-frac", 0.25,
        "--batch_size", 8, "--epochs", 1, "--normalize", "false", "--out", tmp_path / "reward")
    rows = metrics(tmp_path / "reward")
    assert rows[-1]["val/gold_pairs"] > 0  # held-out task prompts, judged against gold
    assert loads_safely(tmp_path / "reward" / "ckpt.pt")["kind"] == "reward"


def test_sft_same_global_batch_same_loss_on_one_and_two_processes(sft_two_processes, tmp_path):
    # one process with the whole batch in one pass against two processes with 4 sequences each:
    # the loss is a mean over the global batch's tokens, however the batch is split
    run("sft.py", *SFT_ARGS, "--micro_batch_size", 8, "--out", tmp_path / "sft1")
    one, two = metrics(tmp_path / "sft1"), metrics(sft_two_processes)
    # step 1: the same data; steps 2 and 3: the same gradients were applied
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
    assert one[-1]["val_loss"] == pytest.approx(two[-1]["val_loss"], abs=1e-5)


def test_sft_documented_torchrun_command_runs_with_default_batch_sizes(tmp_path):
    run("sft.py", "--n_layer", 1, "--n_embd", 32, "--n_head", 2, "--max_steps", 1, "--n_demos", 128,
        "--out", tmp_path / "sft", nproc=2)
    ckpt = loads_safely(tmp_path / "sft" / "ckpt.pt")
    assert ckpt["step"] == 1 and ckpt["config"]["batch_size"] == 32 and [r["step"] for r in metrics(tmp_path / "sft")] == [1]


# ----------------------------------------------------------------------------- refusals

def one_sentence(proc):
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_sft_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "demos.jsonl"
    good = json.dumps({"prompt": "a: what is 1 plus 2?\nbot:", "response": " 3."})
    path.write_text("\n".join([good, good, '{"prompt": "x", "response": ', good]) + "\n")
    proc = run("sft.py", "--data", path, *SFT_ARGS, "--out", tmp_path / "sft", check=False)
    last = one_sentence(proc)
    assert "demos.jsonl" in last and "3" in last.replace(str(tmp_path), ""), last
    assert not (tmp_path / "sft" / "ckpt.pt").exists()


def test_ppo_refuses_a_policy_as_reward_model(tiny_ckpts, tmp_path):
    proc = run("ppo.py", "--init", tiny_ckpts / "policy.pt", "--reward", tiny_ckpts / "policy.pt", *PPO_ARGS,
               "--out", tmp_path / "ppo", check=False)
    last = one_sentence(proc)
    assert "policy.pt" in last and "policy" in last.replace("policy.pt", "") and "reward" in last, last


def test_ppo_refuses_fewer_prompts_than_a_rollout(tiny_ckpts, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    proc = run("ppo.py", "--init", tiny_ckpts / "policy.pt", "--reward", tiny_ckpts / "reward.pt", "--data", path,
               *PPO_ARGS, "--out", tmp_path / "ppo", check=False)
    last = one_sentence(proc)
    assert "prompts.jsonl" in last and "2 prompts" in last and "8" in last, last


def test_mps_is_refused_in_one_sentence(tmp_path):
    proc = run("sft.py", *SFT_ARGS, "--device", "mps", "--out", tmp_path / "sft", check=False)
    last = one_sentence(proc)
    assert "--device mps is not supported" in last and "--device cpu" in last, last


def test_a_task_of_the_suite_runs_through_every_stage(tmp_path):
    """--data task:sort: SFT learns the task's demonstrations with its own tokenizer, the reward
    model ranks SFT's samples by the task's raters, and PPO logs the task's hidden gold."""
    # a context room for any 40 tokens of an untrained model's bytes (they re-encode longer)
    run("sft.py", *SFT_ARGS, "--data", "task:sort", "--block_size", 256, "--out", tmp_path / "sft")
    assert loads_safely(tmp_path / "sft" / "ckpt.pt")["model_config"]["tokenizer"] == "task:sort"
    run("reward.py", "--data", "task:sort", "--init", tmp_path / "sft" / "ckpt.pt", "--task_prompts", 40, "--val_frac", 0.25,
        "--batch_size", 8, "--epochs", 1, "--out", tmp_path / "rm")
    assert "val/accuracy" in metrics(tmp_path / "rm")[-2]  # (the last row is the normalisation)
    run("ppo.py", "--data", "task:sort", "--init", tmp_path / "sft" / "ckpt.pt", "--reward", tmp_path / "rm" / "ckpt.pt",
        *PPO_ARGS, "--advantage", "rloo", "--out", tmp_path / "rloo")
    rows = metrics(tmp_path / "rloo")
    assert all("gold" in r for r in rows if "ppo/policy_loss" in r) and any("eval/gold" in r for r in rows)
    proc = run("sft.py", *SFT_ARGS, "--data", "task:nope", "--out", tmp_path / "x", check=False)
    assert "no such task" in one_sentence(proc) and "task:sort" in one_sentence(proc)


def test_eval_judges_every_task_of_the_suite(tiny_ckpts, tmp_path):
    """eval.py on each task's test prompts: its gold and the criteria its judge reports (some apply
    to some prompts only: follow's word rules)."""
    for name in ("sort", "follow", "facts", "refuse"):
        run("eval.py", "--init", tiny_ckpts / "policy.pt", "--prompts", f"task:{name}", "--demos", f"task:{name}",
            "--n", 16, "--max_new_tokens", 8, "--out", tmp_path / f"{name}.json")
        models = json.loads((tmp_path / f"{name}.json").read_text())["models"]
        assert "gold" in models[str(tiny_ckpts / "policy.pt")] and "criteria" in models[str(tiny_ckpts / "policy.pt")]
