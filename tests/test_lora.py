"""LoRA on both families: after add_lora only the adapters (and a head the caller adds) train; the
merged model computes what the adapted one does; under lora_disabled the model is its base;
checkpoints rebuild the adapters; save_pretrained writes merged weights that transformers reads;
the Sampler decodes with merged weights and follows load()."""

import copy
import os

import pytest
import torch

import common
from model import (GPT, LORA_TARGETS, PROJECTIONS, GPTConfig, Sampler, add_lora, lora_disabled, lora_state_dict, merge_lora,
                   merged_state_dict)

ARCHS = pytest.mark.parametrize("arch", ["gpt2", "llama"])


def tiny(arch, head="lm", seed=0):
    torch.manual_seed(seed)
    kw = dict(arch="llama", n_kv_head=1, tie_embeddings=False) if arch == "llama" else {}
    return GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=32, head=head, tokenizer="task",
                         **kw)).eval()


def with_lora(arch, head="lm", targets=None):
    """A tiny model with adapters on every projection, their B drawn at random so they matter."""
    model = tiny(arch, head)
    add_lora(model, rank=4, alpha=8, targets=targets or PROJECTIONS[arch])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    return model


def batch():
    ids = torch.randint(1, 50, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :6] = 0
    return ids, mask


@ARCHS
@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_only_adapters_and_head_train(arch, head):
    model = tiny(arch, head)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = add_lora(model, rank=4, alpha=8)
    if head == "scalar":  # a value model trains its head too: the caller's choice
        model.score.requires_grad_(True)
        params += list(model.score.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if n.endswith(("lora_A", "lora_B"))}
    assert len(adapters) == 2 * len(LORA_TARGETS[arch]) * 2  # A and B of each attention projection, in each of two blocks
    assert trainable == adapters | ({"score.weight", "score.bias"} if head == "scalar" else set())
    ids, mask = batch()
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        out = model(ids[:, :-1], mask[:, :-1], targets=ids[:, 1:]) if head == "lm" else model(ids, mask)
        loss = -(out * mask[:, 1:]).mean() if head == "lm" else (out * mask).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in after if k not in before or not torch.equal(after[k], before[k])}
    assert changed == trainable  # every adapter (and the head) moved; nothing else did


@ARCHS
def test_merged_equals_adapted_and_disabled_equals_base(arch):
    base = tiny(arch)
    model = with_lora(arch)
    ids, mask = batch()
    with torch.no_grad():
        adapted = model(ids, mask)
        assert (adapted - base(ids, mask)).abs().max() > 1e-2  # the adapters matter
        with lora_disabled(model):
            assert torch.equal(model(ids, mask), base(ids, mask))  # the base weights alone, exactly
        assert torch.equal(model(ids, mask), adapted)  # and back on afterwards
        merged = merge_lora(copy.deepcopy(model))
        assert not any("lora" in n for n, _ in merged.named_parameters()) and merged.config.lora_rank == 0
        torch.testing.assert_close(merged(ids, mask), adapted, rtol=0, atol=1e-5)
        plain = GPT(base.config)  # the merged state dict is a plain model's checkpoint
        plain.load_state_dict(merged_state_dict(model))
        torch.testing.assert_close(plain.eval()(ids, mask), adapted, rtol=0, atol=1e-5)
        assert any("lora" in n for n, _ in model.named_parameters())  # merged_state_dict left the model as it was


@ARCHS
def test_checkpoint_rebuilds_adapters(arch, tmp_path):
    from sft import Config
    model = with_lora(arch)
    ids, mask = batch()
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, model, kind="policy", config=Config(), step=0)
    ckpt = common.load_checkpoint(path, kind="policy")
    again = GPT(GPTConfig(**ckpt["model_config"]))  # GPT(config) adds the recorded adapters
    again.load_state_dict(ckpt["model"])
    assert again.config.lora_rank == 4 and again.config.lora_targets == model.config.lora_targets
    assert torch.equal(again.eval()(ids, mask), model(ids, mask))
    merged = common.load_model(path, kind="policy").eval()  # what the next stage starts from: adapters folded in
    assert merged.config.lora_rank == 0 and not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(merged(ids, mask), model(ids, mask), rtol=0, atol=1e-5)
    adapters = lora_state_dict(model)
    assert adapters and all(k.endswith(("lora_A", "lora_B")) for k in adapters)
    fresh = tiny(arch)  # the same base, new adapters, then the saved ones loaded into them
    add_lora(fresh, rank=4, alpha=8, targets=model.config.lora_targets)
    missing, unexpected = fresh.load_state_dict(adapters, strict=False)
    assert not unexpected and not any("lora" in k for k in missing)
    assert torch.equal(fresh.eval()(ids, mask), model(ids, mask))


@ARCHS
def test_save_pretrained_writes_merged_weights(arch, tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    model = with_lora(arch)
    model.save_pretrained(tmp_path)
    assert not any("lora" in k for k in load_file(os.path.join(tmp_path, "model.safetensors")))
    from test_gpt2 import assert_close_on_tokens, hf_logits
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = batch()
    with torch.no_grad():
        assert_close_on_tokens(model(ids, mask), hf_logits(hf, ids, mask), mask)


@ARCHS
def test_sampler_decodes_with_merged_weights(arch):
    model = with_lora(arch)
    ids, mask = batch()
    sampler = Sampler(model, cuda_graph=False)
    assert sampler.model is not model and not any("lora" in n for n, _ in sampler.model.named_parameters())
    assert torch.equal(sampler.generate(ids, mask, 12, temperature=0),
                       model.generate(ids, mask, 12, temperature=0, use_cache=False))
    with torch.no_grad():  # a training step's worth of change to the adapters
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.add_(torch.randn_like(p) * 0.2)
    expected = model.generate(ids, mask, 12, temperature=0, use_cache=False)
    sampler.load(model)
    assert torch.equal(sampler.generate(ids, mask, 12, temperature=0), expected)


def test_targets():
    gpt2 = tiny("gpt2")
    add_lora(gpt2, rank=2)
    assert gpt2.transformer.h[0].attn.c_proj.lora_A is not None and gpt2.transformer.h[0].mlp.c_proj.lora_A is None
    both = tiny("gpt2")
    add_lora(both, rank=2, targets=["c_proj"])  # a bare name: the attention's and the MLP's
    assert both.transformer.h[0].attn.c_proj.lora_A is not None and both.transformer.h[0].mlp.c_proj.lora_A is not None
    with pytest.raises(ValueError, match="no projection 'q_proj'.*a gpt2 block has attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj"):
        add_lora(tiny("gpt2"), rank=2, targets=["q_proj"])
