"""GPT-2 in and out: logits match Hugging Face's GPT-2 both ways (fp32, left padding), reward
heads travel beside the trunk, bad directories stop with one sentence, GPT-2's tokenizer
round-trips, and the stages run from a GPT-2 directory. `transformers` is a test-only dependency."""

import json
import os
import subprocess
import sys

import pytest
import torch

from common import CheckpointError, load_model
from data.formats import DataError
from data.tokenizer import GPT2_BPE_ENV, get_tokenizer
from model import GPT, GPTConfig, PretrainedError, position_ids_from_mask

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPE_FILE = os.path.join(ROOT, "..", "shared", "tokenizers", "r50k_base.tiktoken")
needs_bpe = pytest.mark.skipif(not os.path.isfile(BPE_FILE),
                               reason=f"GPT-2's BPE file is missing: expected {os.path.normpath(BPE_FILE)}")
TINY = dict(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=50257)  # GPT-2's vocabulary, tiny trunk


def hf_gpt2(seed=0):
    """A small random GPT2LMHeadModel. Every weight, LayerNorms included, drawn at std 0.1 so
    that a wrong mapping or a missing transpose changes the logits far beyond the tolerance."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def our_gpt2(head="lm", tokenizer="gpt2", seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=4, n_embd=32, head=head, tokenizer=tokenizer))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def left_padded_batch():
    """(3, 12) ids and mask; rows 1 and 2 start with 4 and 9 pads."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :9] = 0
    ids[mask == 0] = 50256
    return ids, mask


def hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits


def assert_close_on_tokens(a, b, mask):
    """Logits of real tokens agree to 1e-4 (a pad's output is nobody's business)."""
    real = mask.bool()
    diff = (a[real] - b[real]).abs().max().item()
    assert diff <= 1e-4, f"max abs logit difference {diff}"
    assert a[real].std() > 0.05  # the comparison has something to compare


@pytest.fixture
def hf_dir(tmp_path):
    path = tmp_path / "gpt2-tiny"
    hf_gpt2().save_pretrained(path)
    return str(path)


@pytest.fixture
def bpe(monkeypatch):
    """GPT-2's tokenizer from the local file, in this process and in the stages it starts."""
    if not os.path.isfile(BPE_FILE):
        pytest.skip(f"GPT-2's BPE file is missing: expected {os.path.normpath(BPE_FILE)}")
    monkeypatch.setenv(GPT2_BPE_ENV, BPE_FILE)
    get_tokenizer.cache_clear()
    yield get_tokenizer("gpt2")
    get_tokenizer.cache_clear()


# ----------------------------------------------------------------------------- parity

def test_from_pretrained_matches_transformers(hf_dir):
    ids, mask = left_padded_batch()
    ours = GPT.from_pretrained(hf_dir).eval()
    assert ours.config.block_size == 64 and ours.config.tokenizer == "gpt2" and ours.config.head == "lm"
    assert ours.lm_head.weight is ours.transformer.wte.weight  # still tied after loading
    with torch.no_grad():
        logits = ours(ids, mask)
    assert_close_on_tokens(logits, hf_logits(transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval(), ids, mask), mask)


def test_parity_check_can_fail(hf_dir):
    """A forgotten transpose of one square Conv1D weight (attn.c_proj: 32 x 32, so no shape
    error) moves the logits far past the tolerance."""
    ids, mask = left_padded_batch()
    ours = GPT.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        w = ours.transformer.h[1].attn.c_proj.weight
        w.copy_(w.t().clone())
        logits = ours(ids, mask)
    expected = hf_logits(transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval(), ids, mask)
    assert (logits - expected)[mask.bool()].abs().max() > 1e-2


def test_from_pretrained_reads_pytorch_model_bin(hf_dir):
    """The older layout: pytorch_model.bin, read with weights_only=True."""
    from safetensors.torch import load_file
    state = load_file(os.path.join(hf_dir, "model.safetensors"))
    torch.save(state, os.path.join(hf_dir, "pytorch_model.bin"))
    os.remove(os.path.join(hf_dir, "model.safetensors"))
    ids, mask = left_padded_batch()
    with torch.no_grad():
        logits = GPT.from_pretrained(hf_dir).eval()(ids, mask)
    assert_close_on_tokens(logits, hf_logits(hf_gpt2(), ids, mask), mask)


def test_save_pretrained_loads_in_transformers(tmp_path):
    ours = our_gpt2()
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        logits = ours(ids, mask)
    assert_close_on_tokens(logits, hf_logits(hf, ids, mask), mask)
    back = GPT.from_pretrained(str(tmp_path))  # and back again, exactly
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))


def test_reward_model_saves_trunk_and_head(tmp_path):
    reward = our_gpt2(head="scalar")
    reward.save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "score.safetensors")
    ids, mask = left_padded_batch()
    loaded = load_model(str(tmp_path), kind="reward").eval()
    assert loaded.config.head == "scalar"
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), reward(ids, mask))
    assert load_model(str(tmp_path), kind="policy").config.head == "lm"  # the trunk is a language model too
    transformers.GPT2LMHeadModel.from_pretrained(tmp_path)  # which Hugging Face loads as it is


def test_load_model_from_gpt2_directory(hf_dir):
    assert load_model(hf_dir, kind="policy").config.head == "lm"
    fresh = load_model(hf_dir, kind=("policy", "reward"), head="scalar")  # reward.py starts here
    assert fresh.config.head == "scalar" and fresh.score is not None
    with pytest.raises(CheckpointError, match="without a score.safetensors head, so a language model, but this takes a reward model"):
        load_model(hf_dir, kind="reward")


# ----------------------------------------------------------------------------- refusals

def edit_config(path, **changes):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    config.update(changes)
    with open(file, "w") as f:
        json.dump(config, f)


def test_refusals_are_one_sentence(hf_dir, tmp_path):
    with pytest.raises(PretrainedError, match="no config.json"):
        GPT.from_pretrained(str(tmp_path))
    os.remove(os.path.join(hf_dir, "model.safetensors"))
    with pytest.raises(PretrainedError, match="no model.safetensors or pytorch_model.bin"):
        GPT.from_pretrained(hf_dir)


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "llama"}, "model_type is 'llama'; only GPT-2"),
    ({"activation_function": "relu"}, "activation_function = 'relu' is not supported"),
    ({"n_embd": 64}, r"has shape .* but its config.json implies"),
    ({"n_layer": 3}, "weight transformer.h.2.ln_1.weight is missing"),
    ({"vocab_size": 1000}, r"has shape|smaller than GPT-2's"),
])
def test_refuses_bad_config(hf_dir, changes, message):
    edit_config(hf_dir, **changes)
    with pytest.raises(CheckpointError, match=message):  # as the stages see it: one sentence, no traceback
        load_model(hf_dir, kind="policy")


# ----------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("text", [
    "Hello world",
    "\n\nHuman: What is 2 + 2?\n\nAssistant: 4.<|endoftext|>",
    "naïve café, Grüße, 東京, Привет 🤖",
    "  leading spaces and trailing\t\n",
])
def test_gpt2_tokenizer_round_trips(bpe, text):
    ids = bpe.encode(text, allowed_special="all")
    assert bpe.decode(ids) == text
    assert ("<|endoftext|>" in text) == (50256 in ids)


def test_gpt2_tokenizer_is_gpt2s(bpe):
    assert bpe.n_vocab == 50257 and bpe.eot_token == 50256
    assert bpe.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    assert bpe.encode("<|endoftext|>", disallowed_special=()) != [50256]  # user text is never EOS


def test_gpt2_tokenizer_missing_file_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv(GPT2_BPE_ENV, str(tmp_path / "nope.tiktoken"))
    get_tokenizer.cache_clear()
    try:
        with pytest.raises(DataError, match=f"nope.tiktoken: no such file \\(named by {GPT2_BPE_ENV}"):
            get_tokenizer("gpt2")
    finally:
        get_tokenizer.cache_clear()


# ----------------------------------------------------------------------------- stages

def run_stage(script, *args):
    result = subprocess.run([sys.executable, script, "--device", "cpu", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_pipeline_from_gpt2_directory(bpe, hf_dir, tmp_path):
    """SFT and the reward model start from a GPT-2 directory; PPO's policy too; the aligned
    policy goes back out as a directory that transformers loads."""
    demos = write_jsonl(tmp_path / "demos.jsonl", [
        {"prompt": f"\n\nHuman: What is {a} plus {b}?\n\nAssistant:", "response": f" {a + b}."}
        for a in range(4) for b in range(4)])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"\n\nHuman: Say {w}.\n\nAssistant:", "chosen": f" {w}.", "rejected": " No."}
        for w in ["yes", "hello", "thanks", "okay", "sure", "fine", "good", "great"]])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"\n\nHuman: Count to {n}.\n\nAssistant:"} for n in range(4)])
    out = tmp_path / "out"

    run_stage("sft.py", "--init", hf_dir, "--data", demos, "--max_steps", "2", "--batch_size", "4",
              "--micro_batch_size", "4", "--eval_every", "2", "--warmup_steps", "1", "--out", f"{out}/sft")
    sft = load_model(f"{out}/sft/ckpt.pt", kind="policy")
    assert sft.config.tokenizer == "gpt2" and sft.config.block_size == 64 and sft.config.vocab_size == 50257

    run_stage("reward.py", "--init", hf_dir, "--data", pairs, "--val_frac", "0.3", "--epochs", "1",
              "--batch_size", "2", "--micro_batch_size", "2", "--out", f"{out}/reward")
    assert load_model(f"{out}/reward/ckpt.pt", kind="reward").config.tokenizer == "gpt2"

    run_stage("ppo.py", "--init", hf_dir, "--reward", f"{out}/reward/ckpt.pt", "--data", prompts, "--updates", "1",
              "--batch_size", "4", "--mini_batch_size", "2", "--ppo_epochs", "1", "--max_new_tokens", "4",
              "--out", f"{out}/ppo")
    policy = load_model(f"{out}/ppo/ckpt.pt", kind="policy").eval()
    policy.save_pretrained(f"{out}/hf")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        logits = policy(ids, mask)
    assert_close_on_tokens(logits, hf_logits(transformers.GPT2LMHeadModel.from_pretrained(f"{out}/hf").eval(), ids, mask), mask)


def test_ppo_refuses_reward_model_of_another_tokenizer(tmp_path, hf_dir):
    """The tokenizer travels in config.json: a 'task' reward model beside a GPT-2 policy is refused."""
    our_gpt2(head="scalar", tokenizer="task").save_pretrained(tmp_path / "rm")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}])
    result = subprocess.run([sys.executable, "ppo.py", "--device", "cpu", "--init", hf_dir, "--reward", str(tmp_path / "rm"),
                             "--data", prompts, "--out", str(tmp_path / "ppo")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "rm: uses tokenizer 'task' but" in result.stderr and "uses 'gpt2'" in result.stderr
    assert "Traceback" not in result.stderr
