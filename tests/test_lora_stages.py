"""--lora_rank in every trainer: only the adapters (and a reward or value model's scalar head)
change; the base weights, which are also PPO's and DPO's reference, stay exactly as they were."""

import pytest
import torch

from model import GPT, GPTConfig
from test_stages import PPO_ARGS, loads_safely, run, tiny_ckpts, write_rankings  # noqa: F401  (a fixture)
from data import task

LORA = ["--lora_rank", 2, "--lora_alpha", 4]


def base_weights_unchanged(before, after_path, trains=()):
    """Every weight of `before` is in the checkpoint unchanged, except those whose name starts
    with one of `trains`; the checkpoint holds adapters, and they moved."""
    after = loads_safely(after_path)["model"]
    adapters = [k for k in after if k.endswith((".lora_A", ".lora_B"))]
    assert adapters and any(after[k].abs().sum() > 0 for k in adapters if k.endswith(".lora_B"))
    changed = [k for k in before if not k.startswith(trains) and not torch.equal(before[k], after[k])]
    assert not changed, changed
    return after


@pytest.fixture(scope="module")
def rankings(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_rankings")
    write_rankings(d / "rankings.jsonl", task.prompts("train")[:16])
    write_rankings(d / "val.jsonl", task.prompts("val")[:4], seed=1)
    return d


def test_sft_with_lora_trains_the_adapters_alone(tiny_ckpts, tmp_path):
    run("sft.py", "--init", tiny_ckpts / "policy.pt", *LORA, "--max_steps", 3, "--batch_size", 8, "--n_demos", 32,
        "--eval_every", 3, "--lr", 0.05, "--out", tmp_path / "sft")
    base_weights_unchanged(loads_safely(tiny_ckpts / "policy.pt")["model"], tmp_path / "sft" / "ckpt.pt")
    assert (tmp_path / "sft" / "ckpt.adapters.safetensors").exists()


def test_reward_with_lora_trains_adapters_and_head(tiny_ckpts, rankings, tmp_path):
    run("reward.py", "--data", rankings / "rankings.jsonl", "--val_data", rankings / "val.jsonl", "--init",
        tiny_ckpts / "policy.pt", *LORA, "--batch_size", 8, "--epochs", 1, "--lr", 0.05, "--normalize", "false",
        "--out", tmp_path / "rm")
    after = base_weights_unchanged(loads_safely(tiny_ckpts / "policy.pt")["model"], tmp_path / "rm" / "ckpt.pt")
    assert "score.weight" in after


def test_dpo_with_lora_trains_the_adapters_alone(tiny_ckpts, rankings, tmp_path):
    run("dpo.py", "--data", rankings / "rankings.jsonl", "--val_data", rankings / "val.jsonl", "--init",
        tiny_ckpts / "policy.pt", *LORA, "--batch_size", 8, "--epochs", 1, "--lr", 0.05, "--kl_prompts", 4,
        "--max_new_tokens", 8, "--out", tmp_path / "dpo")
    base_weights_unchanged(loads_safely(tiny_ckpts / "policy.pt")["model"], tmp_path / "dpo" / "ckpt.pt")


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_ppo_with_lora_trains_the_adapters_alone(tiny_ckpts, tmp_path, advantage):
    out = tmp_path / "ppo"
    run("ppo.py", "--init", tiny_ckpts / "policy.pt", "--reward", tiny_ckpts / "reward.pt", *PPO_ARGS, *LORA,
        "--advantage", advantage, "--lr", 0.05, "--out", out)
    base_weights_unchanged(loads_safely(tiny_ckpts / "policy.pt")["model"], out / "ckpt.pt")
    if advantage == "gae":  # the value model too: adapters and its head
        base_weights_unchanged(loads_safely(tiny_ckpts / "reward.pt")["model"], out / "value.pt", trains=("score.",))
    # the next stage loads the policy with its adapters folded in: a plain model that computes the same
    ckpt = loads_safely(out / "ckpt.pt")
    adapted = GPT(GPTConfig(**ckpt["model_config"]))
    adapted.load_state_dict(ckpt["model"])
    import common
    merged = common.load_model(str(out / "ckpt.pt"), kind="policy")
    idx = torch.randint(0, 100, (2, 9))
    torch.testing.assert_close(merged(idx), adapted(idx), atol=1e-5, rtol=1e-5)
    assert not any(k.endswith("lora_A") for k in merged.state_dict())
