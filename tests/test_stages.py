"""The stages: reward.py's Bradley-Terry loss and ppo.py's helpers by hand, then sft.py, reward.py
and ppo.py run as a user runs them (one process and torchrun with two), on tiny models."""

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
import ppo
import reward
import sft
from data import task
from data.formats import ranking_pairs, write_jsonl
from data.tokenizer import get_tokenizer
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120


def nll(margin):
    """-log sigmoid(margin), written out."""
    return -math.log(1 / (1 + math.exp(-margin)))


# ----------------------------------------------------------------------------- reward.ranking_loss

def test_ranking_loss_by_hand():
    pairs_a = ranking_pairs([[0], [1, 2]])  # K = 3, responses 1 and 2 tied below 0
    pairs_b = ranking_pairs([1, 0])  # K = 2, response 1 better
    assert pairs_a == [(0, 1), (0, 2)] and pairs_b == [(1, 0)]
    batch = [([[1], [2], [3]], pairs_a, {}), ([[4], [5]], pairs_b, {})]
    rewards = torch.tensor([1.0, 0.2, -0.5, 0.3, 0.9])
    loss, margins = reward.ranking_loss(rewards, batch)
    expected = ((nll(1.0 - 0.2) + nll(1.0 + 0.5)) / 2 + nll(0.9 - 0.3)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(margins, torch.tensor([0.8, 1.5, 0.6]))


def test_ranking_ties_make_no_pair():
    assert ranking_pairs([[0, 1]]) == []
    assert sorted(ranking_pairs([[0, 2], [1]])) == [(0, 1), (2, 1)]
    # a ranking that is all one tie is dropped, one with a pair is kept
    enc = get_tokenizer("task")
    rows = [{"prompt": "p", "responses": ["a", "b"], "ranking": [[0, 1]]},
            {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [[0, 1], [2]]}]
    stats = {}
    out = reward.encode_rankings(enc, rows, 64, stats)
    assert stats["dropped"] == 1 and len(out) == 1
    seqs, pairs, _ = out[0]
    assert len(seqs) == 3 and sorted(pairs) == [(0, 2), (1, 2)]
    assert all(s[-1] == enc.eot_token for s in seqs)  # scored on the EOS


def test_ranking_loss_each_prompt_weighs_the_same():
    assert len(ranking_pairs(list(range(9)))) == 36  # a full K = 9 ranking implies 36 pairs
    # K = 9 with response 0 above eight tied ones: 8 pairs, each of margin 1; K = 2: one pair of margin 3
    k9 = ranking_pairs([[0], list(range(1, 9))])
    batch = [([[0]] * 9, k9, {}), ([[0]] * 2, [(0, 1)], {})]
    rewards = torch.tensor([1.0] + [0.0] * 8 + [0.0, -3.0])
    loss, _ = reward.ranking_loss(rewards, batch)
    per_prompt = (nll(1.0) + nll(3.0)) / 2
    per_pair = (8 * nll(1.0) + nll(3.0)) / 9
    assert loss.item() == pytest.approx(per_prompt, abs=1e-6)
    assert abs(per_prompt - per_pair) > 0.1  # the two weightings are told apart


# ----------------------------------------------------------------------------- ppo helpers

def test_response_mask():
    response = torch.tensor([[5, 3, 7, 3], [5, 6, 7, 8], [3, 1, 1, 1], [5, 6, 7, 3]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(ppo.response_mask(response, 3), expected)


def test_masked_whiten():
    torch.manual_seed(0)
    x = torch.randn(4, 7) * 3 + 5
    mask = (torch.rand(4, 7) > 0.3).float()
    w = ppo.masked_whiten(x, mask)
    valid = w[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert valid.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask.bool()] == 0).all()
    # what sits under the mask does not matter
    torch.testing.assert_close(ppo.masked_whiten(torch.where(mask.bool(), x, 1e6), mask), w)
    assert ppo.masked_mean(x, mask).item() == pytest.approx(x[mask.bool()].mean().item(), abs=1e-5)


def test_policy_loss_clipping():
    eps = 0.2
    # one token each: ratio 1.5 and 0.5, advantage +1 and -1
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    expected = [-1.2,  # A > 0, ratio above 1 + eps: clipped, no more credit
                1.5,  # A < 0, ratio above: not clipped (pessimistic side)
                -0.5,  # A > 0, ratio below 1 - eps: not clipped
                0.8,  # A < 0, ratio below: clipped
                -1.1]  # inside the range: plain ratio * A
    has_grad = [False, True, True, False, True]
    old = torch.zeros(5)
    for i in range(5):
        logprobs = ratio[i:i + 1].log().clone().requires_grad_(True)
        loss, stats = ppo.policy_loss(logprobs, old[i:i + 1], adv[i:i + 1], torch.ones(1), eps)
        assert loss.item() == pytest.approx(expected[i], abs=1e-6), i
        loss.backward()
        assert (logprobs.grad.abs().item() > 0) == has_grad[i], i
    loss, stats = ppo.policy_loss(ratio.log(), old, adv, torch.tensor([1.0, 1, 1, 1, 0]), eps)
    assert loss.item() == pytest.approx(sum(expected[:4]) / 4, abs=1e-6)  # masked token left out
    assert stats["ppo/clipfrac"].item() == pytest.approx(1.0)
    assert stats["ppo/ratio_mean"].item() == pytest.approx(1.0)


def test_value_loss_clipping():
    old = torch.zeros(3)
    values = torch.tensor([1.0, 0.1, 1.0], requires_grad=True)
    returns = torch.tensor([1.0, 1.0, 0.0])
    # 1: moved 1.0 > 0.2 towards the return: clipped error (0.2 - 1)^2 = 0.64 wins over 0
    # 2: moved 0.1, inside the clip: (0.1 - 1)^2 = 0.81
    # 3: moved 1.0 away from the return: unclipped 1.0 wins over clipped 0.04
    per_token = [0.64, 0.81, 1.0]
    for i in range(3):
        loss, stats = ppo.value_loss(values[i:i + 1], old[i:i + 1], returns[i:i + 1], torch.ones(1), 0.2)
        assert loss.item() == pytest.approx(0.5 * per_token[i], abs=1e-6), i
    loss, stats = ppo.value_loss(values, old, returns, torch.ones(3), 0.2)
    assert loss.item() == pytest.approx(0.5 * sum(per_token) / 3, abs=1e-6)
    assert stats["val/clipfrac"].item() == pytest.approx(2 / 3)
    loss.backward()
    assert values.grad[0].item() == 0 and values.grad[1].item() != 0 and values.grad[2].item() != 0


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


DESIGN_METRICS = ["objective/score", "objective/kl", "objective/entropy", "objective/rlhf_reward",
                  "ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl", "ppo/clipfrac", "ppo/ratio_mean",
                  "val/explained_var", "val/clipfrac", "rollout/resp_len", "rollout/eos_rate", "beta", "tok/s",
                  "time/generation", "time/scoring", "time/training"]
PPO_ARGS = ["--updates", 2, "--batch_size", 8, "--mini_batch_size", 4, "--max_new_tokens", 8]


def test_ppo_first_ratio_is_exactly_one(tiny_ckpts, tmp_path):
    out = tmp_path / "ppo"
    run("ppo.py", "--init", tiny_ckpts / "policy.pt", "--reward", tiny_ckpts / "reward.pt", *PPO_ARGS,
        "--ppo_epochs", 2, "--out", out)
    rows = [r for r in metrics(out) if "ppo/policy_loss" in r]  # the training rows (eval/* rows apart)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["ppo/first_ratio_error"] == 0.0
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


def test_stages_under_torchrun(sft_two_processes, tmp_path):
    sft_ckpt = sft_two_processes / "ckpt.pt"
    assert loads_safely(sft_ckpt)["kind"] == "policy"
    assert [r["step"] for r in metrics(sft_two_processes)] == [1, 2, 3]

    train = task.prompts("train")
    write_rankings(tmp_path / "rankings.jsonl", train[:24])
    write_rankings(tmp_path / "val.jsonl", train[24:32], seed=1)
    run("reward.py", "--data", tmp_path / "rankings.jsonl", "--val_data", tmp_path / "val.jsonl",
        "--init", sft_ckpt, "--batch_size", 8, "--micro_batch_size", 4, "--epochs", 1,
        "--out", tmp_path / "reward", nproc=2)
    rm = loads_safely(tmp_path / "reward" / "ckpt.pt")
    assert rm["kind"] == "reward" and rm["model_config"]["head"] == "scalar"
    assert any("val/accuracy" in row for row in metrics(tmp_path / "reward"))

    run("ppo.py", "--init", sft_ckpt, "--reward", tmp_path / "reward" / "ckpt.pt", *PPO_ARGS,
        "--out", tmp_path / "ppo", nproc=2)
    rows = [r for r in metrics(tmp_path / "ppo") if "ppo/policy_loss" in r]
    assert len(rows) == 2 and rows[0]["ppo/first_ratio_error"] == 0.0
    assert loads_safely(tmp_path / "ppo" / "ckpt.pt")["kind"] == "policy"
    assert loads_safely(tmp_path / "ppo" / "value.pt")["kind"] == "value"


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
    assert (tmp_path / "sft" / "ckpt.pt").exists()


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
