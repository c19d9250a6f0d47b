"""The llama block (Llama, Qwen2, Qwen3) in and out: logits match transformers' LlamaForCausalLM,
Qwen2ForCausalLM and Qwen3ForCausalLM both ways (fp32, left padding), GQA, tied and untied heads,
Llama 3.1's rope scaling, Qwen2's biases and Qwen3's q/k norm included; reward heads travel
beside the trunk; sharded files load; what model.py does not implement is refused in one
sentence; a new llama model trains with the task tokenizer. `transformers` is test-only."""

import dataclasses
import json
import os

import pytest
import torch

from model import GPT, GPTConfig, PretrainedError, position_ids_from_mask

transformers = pytest.importorskip("transformers")
from test_gpt2 import assert_close_on_tokens, edit_config, hf_logits  # noqa: E402  (the GPT-2 parity tests' helpers)

BASE = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, rms_norm_eps=1e-5)  # 300 tokens: the embedding gets padding rows
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # with head_dim 8: one frequency blended, three divided
CASES = {  # name: (model class, its config, the options that differ from BASE)
    "llama-gqa-untied": ("LlamaForCausalLM", "LlamaConfig",
                         dict(num_key_value_heads=2, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "llama-tied-llama3-rope": ("LlamaForCausalLM", "LlamaConfig",
                               dict(num_key_value_heads=4, tie_word_embeddings=True, rope_parameters={**LLAMA3_ROPE, "rope_theta": 10000.0})),
    "qwen2-biases-gqa": ("Qwen2ForCausalLM", "Qwen2Config", dict(num_key_value_heads=1, tie_word_embeddings=False)),
    "qwen3-qk-norm-tied": ("Qwen3ForCausalLM", "Qwen3Config",
                           dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),  # head_dim * heads != hidden_size
    "qwen3-attention-bias": ("Qwen3ForCausalLM", "Qwen3Config",
                             dict(num_key_value_heads=2, head_dim=8, attention_bias=True, tie_word_embeddings=False)),
}


def randomize_(model, seed=0):
    """Every weight drawn anew: matrices and biases at std 0.1, norm weights around 1, so that a
    wrong mapping, a missing bias or a misplaced norm moves the logits far past the tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name or "ln_" in name else 0.1 * noise)
    return model


def hf_model(case):
    cls, config_cls, options = CASES[case]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, config_cls)(**{**BASE, **options}))
    return randomize_(model).eval()


@pytest.fixture(params=list(CASES))
def hf_dir(request, tmp_path):
    path = tmp_path / request.param
    hf_model(request.param).save_pretrained(path)
    return str(path)


def left_padded_batch(vocab=300):
    """(3, 12) ids and mask; rows 1 and 2 start with 4 and 9 pads."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :9] = 0
    ids[mask == 0] = 0
    return ids, mask


def load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


# ----------------------------------------------------------------------------- parity, both ways

def test_from_pretrained_matches_transformers(hf_dir):
    hf = load_hf(hf_dir)
    ours = GPT.from_pretrained(hf_dir).eval()
    c, h = ours.config, hf.config
    assert c.arch == "llama" and c.n_kv_head == h.num_key_value_heads
    assert c.head_dim == (h.head_dim if "head_dim" in h.to_dict() else h.hidden_size // h.num_attention_heads)
    assert c.tie_embeddings == h.tie_word_embeddings == (ours.lm_head.weight is ours.transformer.wte.weight)
    assert c.tokenizer == os.path.abspath(hf_dir)  # an HF directory is its own tokenizer
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert_close_on_tokens(ours(ids, mask), hf_logits(hf, ids, mask), mask)
        assert_close_on_tokens(ours(ids), hf(input_ids=ids).logits, torch.ones_like(mask))  # no mask: flash's causal path


def test_save_pretrained_loads_in_transformers(hf_dir, tmp_path):
    ours = randomize_(GPT.from_pretrained(hf_dir), seed=1).eval()  # weights of our own, not the file's
    ours.save_pretrained(tmp_path / "out")
    hf = load_hf(tmp_path / "out")
    assert type(hf).__name__ == json.load(open(os.path.join(hf_dir, "config.json")))["architectures"][0]
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert_close_on_tokens(ours(ids, mask), hf_logits(hf, ids, mask), mask)
    back = GPT.from_pretrained(str(tmp_path / "out"))  # and back again, exactly
    assert dataclasses.replace(back.config, tokenizer=ours.config.tokenizer) == ours.config  # the tokenizer: where it now lies
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))


def test_parity_check_can_fail(tmp_path):
    """RoPE's pairs taken interleaved (Meta's layout) instead of as halves moves the logits past the tolerance."""
    import model as model_py
    path = tmp_path / "llama"
    hf_model("llama-gqa-untied").save_pretrained(path)
    ours = GPT.from_pretrained(str(path)).eval()
    ids, mask = left_padded_batch()

    def interleaved(x, cos, sin):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        cos, sin = cos[:, :, None], sin[:, :, None]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)

    apply_rope, model_py.apply_rope = model_py.apply_rope, interleaved
    try:
        with torch.no_grad():
            logits = ours(ids, mask)
    finally:
        model_py.apply_rope = apply_rope
    assert (logits - hf_logits(load_hf(str(path)), ids, mask))[mask.bool()].abs().max() > 1e-2


def test_new_llama_saves_as_llama(tmp_path):
    """A model built from size flags (as sft.py --arch llama would) is a LlamaForCausalLM to transformers."""
    torch.manual_seed(0)
    ours = GPT(GPTConfig(arch="llama", block_size=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                         tokenizer="task")).eval()
    assert ours.config.intermediate_size == 128 and ours.config.rope_theta == 10000.0
    ours.save_pretrained(tmp_path)
    hf = load_hf(tmp_path)
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids, mask = left_padded_batch()
    with torch.no_grad():
        a, b = ours(ids, mask), hf_logits(hf, ids, mask)
    assert (a - b)[mask.bool()].abs().max() <= 1e-4
    assert GPT.from_pretrained(str(tmp_path)).config.tokenizer == "task"  # recorded in config.json


def test_reward_model_trunk_and_head(tmp_path):
    """A reward model's trunk is the language model's: transformers reads it and computes the same
    hidden states; the scalar head travels in score.safetensors and comes back exactly."""
    hf_model("qwen2-biases-gqa").save_pretrained(tmp_path / "qwen")
    reward = GPT.from_pretrained(str(tmp_path / "qwen"), head="scalar").eval()
    with torch.no_grad():
        reward.score.weight.normal_(0, 0.5)
        reward.score.bias.fill_(0.3)
    reward.save_pretrained(tmp_path / "rm")
    assert os.path.exists(tmp_path / "rm" / "score.safetensors")
    ids, mask = left_padded_batch()
    hf = load_hf(tmp_path / "rm")
    with torch.no_grad():
        hidden = hf.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).last_hidden_state
        assert_close_on_tokens(reward.hidden_states(ids, mask), hidden, mask)
        back = GPT.from_pretrained(str(tmp_path / "rm")).eval()
        assert back.config.head == "scalar"  # the head beside it makes it a reward model
        assert torch.equal(back(ids, mask), reward(ids, mask))


def test_sharded_checkpoint(tmp_path):
    hf = hf_model("llama-gqa-untied")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json") and not os.path.exists(tmp_path / "model.safetensors")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert_close_on_tokens(GPT.from_pretrained(str(tmp_path)).eval()(ids, mask), hf_logits(hf, ids, mask), mask)


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("changes, message", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]},
     "model_type is 'mistral'; only these can be loaded: GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"),
    ({"architectures": ["LlamaForSequenceClassification"]}, r"architectures \['LlamaForSequenceClassification'\] is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "rope_type default or llama3 is"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu' is not supported"),
    ({"num_hidden_layers": 3}, "weight model.layers.2.input_layernorm.weight is missing"),
    ({"hidden_size": 64}, r"has shape .* but its config.json implies"),
])
def test_refuses_what_is_not_implemented(tmp_path, changes, message):
    hf_model("llama-gqa-untied").save_pretrained(tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(PretrainedError, match=message) as info:
        GPT.from_pretrained(str(tmp_path))
    assert "\n" not in str(info.value)


def test_reads_the_older_rope_fields(tmp_path):
    """Files written before transformers 5 hold rope_theta and rope_scaling, not rope_parameters."""
    hf = hf_model("llama-tied-llama3-rope")
    hf.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    assert ours.config.rope_scaling["rope_type"] == "llama3"
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert_close_on_tokens(ours(ids, mask), hf_logits(hf, ids, mask), mask)


# ----------------------------------------------------------------------------- from scratch

def test_new_llama_trains_with_task_tokenizer():
    """A new llama model on the task tokenizer: an odd vocabulary padded to 128 rows, both of an
    untied head's matrices cut back in checkpoints, the padding never trained, the loss falling."""
    from data.tokenizer import get_tokenizer, pad
    enc = get_tokenizer("task")
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="llama", block_size=32, vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_kv_head=1,
                          n_embd=32, tie_embeddings=False, tokenizer="task"))
    V = enc.n_vocab
    assert V % 128 and model.lm_head.weight.shape[0] == model.config.padded_vocab
    ids, mask = pad([enc.encode(t) + [enc.eot_token] for t in ["Alice has 3 apples.", "Bob has 12 pears."]], enc.eot_token)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        logprobs = model(ids[:, :-1], targets=ids[:, 1:])
        loss = -(logprobs * mask[:, 1:]).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        assert (model.lm_head.weight.grad[V:] == 0).all() and (model.transformer.wte.weight.grad[V:] == 0).all()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert (model.lm_head.weight[V:] == 0).all()  # zero, no gradient, no weight decay to move them
    state = model.state_dict()
    assert state["lm_head.weight"].shape[0] == state["transformer.wte.weight"].shape[0] == V
