"""model.py and common.py's checkpoints: KV-cache generation against the naive loop, the causal
and padding masks, the scalar head, sample_token's filters, and checkpoint refusals."""

import os

import pytest
import torch

import common
from model import GPT, GPTConfig, Sampler, sample_token

EOS = 3  # any id works as EOS for a random model; 3 is common enough to be sampled sometimes


def tiny_gpt(seed=0, head="lm", arch="gpt2", **kw):
    """A small random model; arch="llama" with GQA (2 query heads on 1 key/value head) and an untied head."""
    torch.manual_seed(seed)
    if arch == "llama":
        kw = dict(arch="llama", n_kv_head=1, tie_embeddings=False, **kw)
    config = GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=32, head=head,
                       tokenizer="task", **kw)
    return GPT(config).eval()


ARCHS = pytest.mark.parametrize("arch", ["gpt2", "llama"])


def left_pad(prompts, pad_id=0):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    return ids, mask


PROMPTS = [[5, 9, 11, 2, 7, 30], [4, 4], [17, 1, 40, 22], [8]]  # 0, 4, 2 and 5 pads


# ----------------------------------------------------------------------------- generation

@ARCHS
def test_kv_cache_equals_naive_generation_left_padded(arch):
    model = tiny_gpt(arch=arch)
    ids, mask = left_pad(PROMPTS)
    cached = model.generate(ids, mask, 20, temperature=0, use_cache=True)
    naive = model.generate(ids, mask, 20, temperature=0, use_cache=False)
    assert cached.shape == (4, 20)
    assert torch.equal(cached, naive)


@ARCHS
def test_kv_cache_equals_naive_with_eos(arch):
    model = tiny_gpt(arch=arch)
    ids, mask = left_pad(PROMPTS)
    free = model.generate(ids, mask, 20, temperature=0)
    # make the EOS a token that greedy decoding actually produces, mid-way through some row
    eos = int(free[0, 3])
    cached = model.generate(ids, mask, 20, temperature=0, eos_id=eos, use_cache=True)
    naive = model.generate(ids, mask, 20, temperature=0, eos_id=eos, use_cache=False)
    assert torch.equal(cached, naive)
    for row, row_free in zip(cached, free):
        hits = (row_free == eos).nonzero()
        if len(hits):  # up to the first EOS the row is what it would be without EOS, then only EOS
            first = int(hits[0])
            assert torch.equal(row[:first + 1], row_free[:first + 1])
            assert (row[first:] == eos).all()
        else:
            assert torch.equal(row, row_free[:len(row)])
    # sampling stops once every row has ended
    assert model.generate(ids[:1], mask[:1], 20, temperature=0, eos_id=int(free[0, 0])).shape == (1, 1)


def test_kv_cache_equals_naive_when_sampling_with_same_seed():
    model = tiny_gpt()
    ids, mask = left_pad(PROMPTS)
    a = model.generate(ids, mask, 12, temperature=1.0, use_cache=True, generator=torch.Generator().manual_seed(1))
    b = model.generate(ids, mask, 12, temperature=1.0, use_cache=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_row_generates_what_it_would_alone(use_cache):
    model = tiny_gpt()
    ids, mask = left_pad(PROMPTS)
    batch = model.generate(ids, mask, 15, temperature=0, use_cache=use_cache)
    for i, p in enumerate(PROMPTS):
        alone_ids = torch.tensor([p])
        alone = model.generate(alone_ids, torch.ones_like(alone_ids), 15, temperature=0, use_cache=use_cache)
        assert torch.equal(batch[i], alone[0]), f"row {i} ({ids.size(1) - len(p)} pads) differs from its unpadded run"


# ----------------------------------------------------------------------------- masks

def test_causal_mask_later_token_never_changes_earlier_logits():
    model = tiny_gpt()
    torch.manual_seed(1)
    idx = torch.randint(0, 50, (2, 16))
    base = model(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 7) % 50
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t], base[:, t])  # the changed token itself matters


@ARCHS
def test_pad_token_never_changes_real_logits(arch):
    model = tiny_gpt(arch=arch)
    torch.manual_seed(2)
    idx = torch.randint(0, 50, (3, 12))
    mask = torch.ones_like(idx)
    mask[0, :4] = 0  # left pads
    mask[1, 9:] = 0  # right pads
    mask[2, :2] = 0
    mask[2, 10:] = 0
    base = model(idx, mask)
    other = torch.where(mask.bool(), idx, (idx + 13) % 50)  # different pad ids, same real tokens
    out = model(other, mask)
    real = mask.bool()
    torch.testing.assert_close(out[real], base[real], rtol=0, atol=1e-6)
    # and a left-padded row equals the same tokens with no padding at all
    alone = model(idx[0:1, 4:])
    torch.testing.assert_close(base[0, 4:], alone[0], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- scalar head

def test_scalar_head_shape():
    model = tiny_gpt(head="scalar")
    idx = torch.randint(0, 50, (3, 7))
    out = model(idx, torch.ones_like(idx))
    assert out.shape == (3, 7)
    assert model.hidden_states(idx).shape == (3, 7, 32)


def test_load_model_scalar_head_keeps_trunk(tmp_path):
    from sft import Config
    lm = tiny_gpt(seed=5)
    path = str(tmp_path / "sft" / "ckpt.pt")
    common.save_checkpoint(path, lm, kind="policy", config=Config(), step=3)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # loadable with no code run
    assert ckpt["kind"] == "policy" and ckpt["step"] == 3
    rm = common.load_model(path, kind="policy", head="scalar")
    assert rm.config.head == "scalar" and rm.score is not None
    lm_state, rm_state = lm.state_dict(), rm.state_dict()
    trunk = [k for k in lm_state if k.startswith("transformer.")]
    assert trunk
    for k in trunk:
        assert torch.equal(lm_state[k], rm_state[k]), k
    idx = torch.randint(0, 50, (2, 6))
    torch.testing.assert_close(rm.hidden_states(idx), lm.hidden_states(idx))
    # the lm round trip gives the identical model
    again = common.load_model(path, kind="policy")
    torch.testing.assert_close(again(idx), lm(idx), rtol=0, atol=0)


# ----------------------------------------------------------------------------- sample_token

def test_sample_token_filters():
    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    argmax = logits.argmax(-1)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_token(logits, 0.0), argmax)
    assert torch.equal(sample_token(logits, 1.0, top_k=1, generator=gen), argmax)
    assert torch.equal(sample_token(logits, 1.0, top_p=1e-6, generator=gen), argmax)
    top5 = logits.topk(5, dim=-1).indices
    for _ in range(20):
        tok = sample_token(logits, 2.0, top_k=5, generator=gen)
        assert (top5 == tok[:, None]).any(-1).all()


def test_sample_token_top_p_keeps_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps exactly the first two
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(2000, 1)
    tok = sample_token(logits, 1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(tok.tolist()) == {0, 1}


# ----------------------------------------------------------------------------- checkpoints

def test_wrong_kind_checkpoint_names_path_and_kinds(tmp_path):
    from sft import Config
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, tiny_gpt(), kind="policy", config=Config(), step=0)
    with pytest.raises(common.CheckpointError) as info:
        common.load_checkpoint(path, kind="reward")
    msg = str(info.value)
    assert path in msg and "policy" in msg and "reward" in msg
    with pytest.raises(common.CheckpointError):
        common.load_model(str(tmp_path), kind="reward")  # a directory means its ckpt.pt
    assert common.load_checkpoint(str(tmp_path), kind=("policy", "reward"))["kind"] == "policy"


def test_missing_checkpoint_names_path(tmp_path):
    path = str(tmp_path / "nowhere" / "ckpt.pt")
    with pytest.raises(common.CheckpointError) as info:
        common.load_checkpoint(path)
    assert path in str(info.value)


def test_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(common.CheckpointError) as info:
        common.load_checkpoint(str(path))
    assert str(path) in str(info.value)


def test_damaged_or_unsafe_checkpoint_never_suggests_unsafe_loading(tmp_path):
    from sft import Config
    good = tmp_path / "ckpt.pt"
    common.save_checkpoint(str(good), tiny_gpt(), kind="policy", config=Config(), step=0)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:2000])  # a copy cut short
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": Config()}, unsafe)  # a pickled object that weights_only refuses to build
    for path in (cut, unsafe):
        with pytest.raises(common.CheckpointError) as info:
            common.load_checkpoint(str(path))
        message = str(info.value)
        assert message.startswith(f"{path}: not a readable checkpoint") and "\n" not in message
        assert "weights_only" not in message and "trust" not in message, message


def test_save_is_atomic(tmp_path):
    from sft import Config
    out = tmp_path / "out"
    path = str(out / "ckpt.pt")
    common.save_checkpoint(path, tiny_gpt(), kind="policy", config=Config(), step=1)
    common.save_checkpoint(path, tiny_gpt(seed=1), kind="policy", config=Config(), step=2)  # overwrite
    assert os.listdir(out) == ["ckpt.pt"]
    assert common.load_checkpoint(path)["step"] == 2


# ----------------------------------------------------------------------------- the Sampler (static cache, decode step)

@ARCHS
def test_sampler_reused_across_prompt_widths_equals_naive(arch):
    # as in PPO: one Sampler, rollouts of new prompt widths (so new cache lengths, and a buffer
    # that grows), left padding and EOS; every rollout must equal the naive loop
    model = tiny_gpt(arch=arch)
    sampler = Sampler(model, cuda_graph=False)
    g = torch.Generator().manual_seed(3)
    for width, n_new in ((3, 20), (9, 12), (40, 20), (2, 5)):
        prompts = [torch.randint(4, 50, (int(n),), generator=g).tolist() for n in torch.randint(1, width + 1, (5,), generator=g)]
        prompts[0] = prompts[0][:1] + [5] * (width - 1)  # one row of the full width
        ids, mask = left_pad(prompts)
        free = model.generate(ids, mask, n_new, temperature=0, use_cache=False)
        eos = int(free[1, n_new // 2])  # an EOS that greedy decoding produces mid-way
        naive = model.generate(ids, mask, n_new, temperature=0, eos_id=eos, use_cache=False)
        assert torch.equal(sampler.generate(ids, mask, n_new, temperature=0, eos_id=eos), naive), width
        assert torch.equal(sampler.generate(ids, mask, n_new, temperature=0), free), width


@ARCHS
def test_sampler_copy_in_another_dtype_follows_load(arch):
    # the rollout copy (bf16 on a GPU) is refreshed in place by load(), as PPO does once per rollout
    model = tiny_gpt(arch=arch)
    sampler = Sampler(model, dtype=torch.float64, cuda_graph=False)
    assert sampler.model is not model and sampler.model.transformer.wte.weight.dtype == torch.float64
    ids, mask = left_pad(PROMPTS)
    before = sampler.generate(ids, mask, 10, temperature=0)
    assert torch.equal(before, model.generate(ids, mask, 10, temperature=0, use_cache=False))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    expected = model.generate(ids, mask, 10, temperature=0, use_cache=False)
    assert not torch.equal(expected, before)  # the change matters
    assert torch.equal(sampler.generate(ids, mask, 10, temperature=0), before)  # stale until load()
    sampler.load(model)
    assert torch.equal(sampler.generate(ids, mask, 10, temperature=0), expected)


def test_sample_token_draws_in_proportion():
    # the host-sync-free draw (argmax of p / Exp(1) noise) follows the probabilities
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    tok = sample_token(probs.log().repeat(20000, 1), 1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=4).float() / len(tok)
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


# ----------------------------------------------------------------------------- vocabulary padding, heads

@ARCHS
def test_vocab_padding_is_never_seen(arch):
    model = tiny_gpt(arch=arch)  # vocab_size 50: 128 embedding rows
    assert model.transformer.wte.weight.shape[0] == 128 and model.config.padded_vocab == 128
    with torch.no_grad():
        model.transformer.wte.weight[50:] = 5.0  # padding rows that would win every softmax
        model.lm_head.weight[50:] = 5.0  # the same rows where the head is tied, its own where not
    idx = torch.randint(0, 50, (2, 9))
    logits = model(idx)
    assert logits.shape == (2, 9, 50)
    targets = torch.arange(50)[:, None, None].expand(50, 2, 9)  # every real token, at every position
    total = torch.stack([model(idx, targets=t).exp() for t in targets]).sum(0)
    torch.testing.assert_close(total, torch.ones(2, 9))  # all the mass is on real tokens
    assert int(model.generate(idx, torch.ones_like(idx), 30, temperature=1.0, use_cache=False).max()) < 50
    state = model.state_dict()
    assert state["transformer.wte.weight"].shape[0] == state["lm_head.weight"].shape[0] == 50  # checkpoints hold real rows only
    again = GPT(model.config)
    again.load_state_dict(state)
    for w in (again.transformer.wte.weight, again.lm_head.weight):
        assert w.shape[0] == 128 and (w[50:] == 0).all()
    torch.testing.assert_close(again(idx), logits)


def test_forward_from_start_with_targets():
    model = tiny_gpt()
    torch.manual_seed(4)
    ids, mask = left_pad(PROMPTS)
    targets = torch.randint(0, 50, (4, 3))
    full = model(ids, mask)  # (B, T, V)
    logprobs, entropy = model(ids, mask, start=3, targets=targets, temperature=0.7, return_entropy=True)
    expected = torch.log_softmax(full[:, 3:].double() / 0.7, -1)
    torch.testing.assert_close(logprobs.double(), expected.gather(-1, targets[..., None])[..., 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), -(expected.exp() * expected).sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(model(ids, mask, start=3), full[:, 3:])
    value = tiny_gpt(head="scalar")
    torch.testing.assert_close(value(ids, mask, start=2), value(ids, mask)[:, 2:])


def test_no_mask_equals_mask_for_right_padding():
    # right-padded batches (SFT, the reward model) may skip the mask: causal attention keeps real
    # tokens off the pads after them, and positions count from 0 either way
    model = tiny_gpt()
    idx = torch.randint(0, 50, (3, 10))
    mask = torch.ones_like(idx)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    real = mask.bool()
    torch.testing.assert_close(model(idx)[real], model(idx, mask)[real], rtol=0, atol=1e-6)


@ARCHS
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_fused_lm_head_equals_logits_then_logprobs(monkeypatch, kernels, arch):
    # the model's two ways to log-probs of targets: straight from the hidden states
    # (kernels.linear_logprobs) and through the logits (kernels.token_logprobs); with triton,
    # the Triton kernels themselves (the interpreter on CPU), padded vocabulary included
    if kernels == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("MINRLHF_KERNELS", kernels)
    model = tiny_gpt(arch=arch)  # llama: the untied head
    ids, mask = left_pad(PROMPTS)
    targets = torch.randint(0, 50, (4, 3), generator=torch.Generator().manual_seed(0))
    out = {}
    for fused in (True, False):
        model.fused_lm_head = fused
        model.zero_grad()
        logprobs, entropy = model(ids, mask, start=3, targets=targets, temperature=0.7, return_entropy=True)
        (logprobs.sum() + 0.5 * entropy.sum()).backward()
        first_projection = next(model.transformer.h[0].attn.parameters())  # c_attn or q_proj
        out[fused] = (logprobs, entropy, model.lm_head.weight.grad.clone(), first_projection.grad.clone())
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (out[True][2][50:] == 0).all()  # the padding rows get no gradient
