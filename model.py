"""
The one GPT of minRLHF, in two families that differ only in their block, chosen by
GPTConfig.arch:

- "gpt2": GPT-2 (learned positions, pre-LayerNorm, GELU MLP, tied embeddings), with GPT-2's
  parameter names, so its weights map one to one.
- "llama": the block that Llama, Qwen2 and Qwen3 share: rotary positions (RoPE), RMSNorm, a SwiGLU
  MLP, grouped-query attention; as options, untied embeddings, q/k/v biases (Qwen2), a per-head
  RMSNorm of queries and keys (Qwen3), Llama 3.1's rope scaling. Its names follow Hugging Face's
  inside the block (q_proj, gate_proj, ...) and GPT-2's around it (transformer.wte, .h, .ln_f).

The same trunk serves every stage: with `head="lm"` it is the policy (logits over the
vocabulary, or straight to the log-probs of given targets); with `head="scalar"` it is the
reward or value model (one number per position, a Linear(n_embd, 1) on the final hidden state).
LoRA adapters (add_lora below) fit on the projections of either family.

Batches of prompts are LEFT-padded, so that every prompt ends at the same column and
generation appends to all rows at once. Padding never changes a real token's output:
position ids come from the attention mask (a row's first real token is position 0; learned
positions and RoPE alike look them up), and no real token attends to a pad. A batch with no left
pads (right-padded, or none at all) passes attention_mask=None: causal attention alone already
keeps real tokens off the pads after them.

Fast generation (the Sampler below) follows gpt-fast: a static KV cache, the prompt prefilled in
one forward, then a decode step of fixed shapes that a CUDA graph replays.
"""

import contextlib
import copy
import json
import math
import os
import re
import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import linear_logprobs, token_logprobs

# cuDNN attention is left out on purpose: it builds a new plan for every shape it has not seen,
# and PPO brings a new prompt width every rollout (about 50 ms per decoded token on an H100 while
# the widths are new, against 6 ms without it). Flash attention takes the unmasked causal case,
# memory-efficient attention the masked one, the math kernel what neither supports (CPU included).
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
VOCAB_MULTIPLE = 128  # embedding rows are padded to this, so the lm_head matmul and the logits rows are aligned


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (prompt + response) the model sees
    vocab_size: int = 50257  # tokens; the embedding has padding rows up to a multiple of 128 that are never used
    n_layer: int = 12
    n_head: int = 12  # query heads
    n_embd: int = 768
    dropout: float = 0.0  # RLHF runs with dropout off everywhere (N+ implementation details)
    bias: bool = True  # GPT-2's block: biases in every Linear and LayerNorm (the llama block: qkv_bias, o_bias)
    head: str = "lm"  # "lm": next-token logits; "scalar": one value per position (reward, value)
    tokenizer: str = "gpt2"  # "task", "gpt2" or a Hugging Face tokenizer directory; stages refuse mismatches
    arch: str = "gpt2"  # "gpt2": learned positions, LayerNorm, GELU; "llama": RoPE, RMSNorm, SwiGLU (Llama, Qwen2, Qwen3)
    n_kv_head: int = None  # key/value heads, each shared by n_head // n_kv_head query heads (GQA); None: n_head
    head_dim: int = None  # width of one head; None: n_embd // n_head (Qwen3 sets its own)
    intermediate_size: int = None  # MLP width; None: 4 n_embd (GELU), or 8/3 n_embd rounded up to 64 (SwiGLU, as many weights)
    norm_eps: float = 1e-5  # LayerNorm / RMSNorm epsilon
    tie_embeddings: bool = True  # lm_head is wte's matrix (GPT-2 always; small Llamas and Qwens too)
    rope_theta: float = 10000.0  # RoPE's base; Llama 3 uses 500000
    rope_scaling: dict = None  # Llama 3.1's long-context frequencies: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    qkv_bias: bool = False  # biases on q, k, v (Qwen2; Llama's and Qwen3's attention_bias sets it with o_bias)
    o_bias: bool = False  # bias on the attention's output projection
    qk_norm: bool = False  # RMSNorm over each query and key head, before RoPE (Qwen3)
    lora_rank: int = 0  # LoRA adapters: set by add_lora, so that GPT(config) rebuilds them when a checkpoint loads
    lora_alpha: float = 0.0
    lora_targets: tuple = ()

    def __post_init__(self):
        assert self.arch in ("gpt2", "llama"), f"unknown arch {self.arch!r} (gpt2 or llama)"
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        if self.intermediate_size is None:
            # SwiGLU has three matrices to GELU's two: 2/3 of 4 n_embd keeps the count (Shazeer 2020)
            self.intermediate_size = 4 * self.n_embd if self.arch == "gpt2" else -(-8 * self.n_embd // 3 // 64) * 64
        assert self.n_head % self.n_kv_head == 0, f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}"
        if self.arch == "gpt2":
            assert self.n_kv_head == self.n_head and self.head_dim * self.n_head == self.n_embd, \
                "GPT-2's block has n_head heads of n_embd // n_head for queries, keys and values alike"
            assert self.tie_embeddings and not (self.qkv_bias or self.o_bias or self.qk_norm or self.rope_scaling), \
                "tie_embeddings=False, qkv_bias, o_bias, qk_norm and rope_scaling belong to arch='llama'"
        assert self.rope_scaling is None or self.rope_scaling.get("rope_type") == "llama3", \
            f"rope_scaling {self.rope_scaling}: only rope_type 'llama3' is implemented"

    @property
    def padded_vocab(self):
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


# ----------------------------------------------------------------------------- the block's parts

class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without centring or bias (Zhang & Sennrich 2019). Computed in
    fp32 and cast back before the weight multiplies, as Llama's Hugging Face code does."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def make_norm(config, dim):
    """The block's normalisation: GPT-2's LayerNorm or Llama's RMSNorm."""
    if config.arch == "gpt2":
        return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)
    return RMSNorm(dim, config.norm_eps)


def rope_frequencies(config):
    """RoPE's angle per position for each pair of a head's dims (Su et al. 2021): theta^(-2i/d),
    i < d/2. Llama 3.1's rope_scaling divides the low frequencies (long wavelengths) by `factor`,
    keeps the high ones and blends those between (transformers' _compute_llama3_parameters)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))  # (d/2,)
    s = config.rope_scaling
    if s:
        factor, low, high, old = (s[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                  "original_max_position_embeddings"))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        between = (wavelen >= old / high) & (wavelen <= old / low)
        inv_freq = torch.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv_freq


def apply_rope(x, cos, sin):
    """x: (B, T, nh, hd); cos, sin: (B or 1, T, hd/2), for each token's position. Rotates the pairs
    (x_i, x_{i + hd/2}): the "rotate half" layout of the Hugging Face weights (GPT-NeoX's), not the
    interleaved pairs of Meta's original code, whose q and k rows the converters permuted.
    Computed in the table's dtype (fp32 unless the whole model was cast), returned in x's."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, :, None], sin[:, :, None]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear, plus an optional LoRA adapter (Hu et al. 2021): y = x W^T + b + (alpha / r) x A^T B^T,
    with A (r, in) and B (out, r). Without one it is nn.Linear exactly (same parameters, same init).
    See add_lora."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features, bias=bias)
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)
        self.lora_scale = 0.0
        self.lora_enabled = True  # lora_disabled() turns it off: the base weights alone

    def add_adapter(self, rank, alpha):
        w = self.weight
        self.lora_A = nn.Parameter(w.new_empty(rank, self.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) start A
        self.lora_B = nn.Parameter(w.new_zeros(self.out_features, rank))  # B = 0: the adapted model starts as the base
        self.lora_scale = alpha / rank

    def merged_weight(self):
        """W + (alpha / r) B A, computed in fp32, in W's dtype."""
        if self.lora_A is None:
            return self.weight
        delta = self.lora_B.float() @ self.lora_A.float()
        return (self.weight.float() + self.lora_scale * delta).to(self.weight.dtype)

    def forward(self, x):
        y = super().forward(x)
        if self.lora_A is not None and self.lora_enabled:
            y = y + self.lora_scale * F.linear(F.linear(x, self.lora_A), self.lora_B)
        return y


def repeat_kv(x, groups):
    """(B, n_kv_head, S, hd) -> (B, n_kv_head * groups, S, hd): key/value head j serves query heads
    j*groups .. j*groups + groups - 1 (GQA, Ainslie et al. 2023). Repeated here, with fixed shapes for
    the CUDA graph, rather than by SDPA's enable_gqa: only flash attention takes that, and flash
    takes no mask."""
    B, n_kv_head, S, hd = x.shape
    return x[:, :, None].expand(B, n_kv_head, groups, S, hd).reshape(B, n_kv_head * groups, S, hd)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.arch = config.arch
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        if config.arch == "gpt2":
            self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
            self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        else:
            q_width, kv_width = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
            self.q_proj = Linear(config.n_embd, q_width, bias=config.qkv_bias)
            self.k_proj = Linear(config.n_embd, kv_width, bias=config.qkv_bias)
            self.v_proj = Linear(config.n_embd, kv_width, bias=config.qkv_bias)
            self.o_proj = Linear(q_width, config.n_embd, bias=config.o_bias)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, allowed, rope=None, cache=None):
        """allowed: (B, 1, T, S) bool, True where query t may attend to key s; None: causal only.
        rope: (cos, sin) at each token's position, for the llama block (GPT-2's positions are in x).
        cache: (k, v, col) while generating: the layer's static (B, n_kv_head, L, hd) buffers and
        where to write this call's keys: col None writes columns 0..T-1 (the prompt) and attends to
        them alone; a 1-element tensor writes that column and attends to every column, the mask
        choosing (a decode step: the same shapes every step)."""
        B, T, C = x.shape
        if self.arch == "gpt2":
            q, k, v = self.c_attn(x).split(C, dim=2)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim) for t in (k, v))
        if self.q_norm is not None:  # Qwen3: each head's query and key normalised, before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd); k, v (B, n_kv_head, T, hd)
        if cache is not None:
            k_cache, v_cache, col = cache
            if col is None:
                k_cache[:, :, :T], v_cache[:, :, :T] = k, v
            else:
                k_cache.index_copy_(2, col, k)  # a device tensor, so no host sync and graph-safe
                v_cache.index_copy_(2, col, v)
                k, v = k_cache, v_cache  # (B, n_kv_head, L, hd)
        if self.n_kv_head != self.n_head:  # GQA: each key/value head repeated for its queries
            k, v = repeat_kv(k, self.n_head // self.n_kv_head), repeat_kv(v, self.n_head // self.n_kv_head)
        dropout = self.attn_dropout if self.training else 0.0
        with sdpa_kernel(ATTENTION_BACKENDS):
            if allowed is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y) if self.arch == "gpt2" else self.o_proj(y))


class MLP(nn.Module):
    """GPT-2's GELU MLP, or the SwiGLU of Llama and Qwen: down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, config):
        super().__init__()
        self.arch = config.arch
        n, hidden = config.n_embd, config.intermediate_size
        if config.arch == "gpt2":
            self.c_fc = Linear(n, hidden, bias=config.bias)
            self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
            self.c_proj = Linear(hidden, n, bias=config.bias)
        else:
            self.gate_proj = Linear(n, hidden, bias=False)
            self.up_proj = Linear(n, hidden, bias=False)
            self.down_proj = Linear(hidden, n, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.arch == "gpt2":
            return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, allowed, rope=None, cache=None):
        x = x + self.attn(self.ln_1(x), allowed, rope, cache)  # pre-norm, as GPT-2 and Llama
        x = x + self.mlp(self.ln_2(x))
        return x


def position_ids_from_mask(attention_mask):
    """(B, T) mask of 1 = token, 0 = pad -> (B, T) positions; each row's first token is 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_allowed(attention_mask, T_new):
    """Which keys each of the last T_new queries may see: earlier-or-same column and not a pad.
    attention_mask: (B, T_total) over every token so far. Returns (B, 1, T_new, T_total) bool.
    A pad query would see no key at all (softmax of nothing is NaN), so it sees itself."""
    B, T_total = attention_mask.shape
    q_col = torch.arange(T_total - T_new, T_total, device=attention_mask.device)[:, None]
    k_col = torch.arange(T_total, device=attention_mask.device)[None, :]
    allowed = (k_col <= q_col) & attention_mask.bool()[:, None, :]  # (B, T_new, T_total)
    allowed = allowed | (k_col == q_col)
    return allowed[:, None]


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.head in ("lm", "scalar"), f"unknown head {config.head!r}"
        self.config = config
        gpt2 = config.arch == "gpt2"
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **(dict(wpe=nn.Embedding(config.block_size, config.n_embd)) if gpt2 else {}),  # learned positions (GPT-2 only)
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        # reward / value models: the same trunk with one scalar out of the last hidden state
        self.score = nn.Linear(config.n_embd, 1) if config.head == "scalar" else None
        if not gpt2:
            # RoPE's cos and sin at every position, looked up by position id like GPT-2's wpe, so left
            # padding and the decode step need nothing else. Not in checkpoints: computed from the config.
            angles = torch.outer(torch.arange(config.block_size, dtype=torch.float), rope_frequencies(config))
            self.register_buffer("rope_cos", angles.cos(), persistent=False)  # (block_size, head_dim / 2)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                # residual projections scaled by 1/sqrt(2 * n_layer), GPT-2's init (the llama block too)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if self.score is not None:  # N+ implementation details: std 1/sqrt(n_embd + 1), bias 0
            nn.init.normal_(self.score.weight, std=1 / math.sqrt(config.n_embd + 1))
        # Padding rows, zero: never looked up, cut from every softmax. Added after the random init,
        # so that a seed gives the same model whatever the padding (a layout detail).
        padding = config.padded_vocab - config.vocab_size
        self.transformer.wte.weight = nn.Parameter(F.pad(self.transformer.wte.weight.detach(), (0, 0, 0, padding)))
        self.transformer.wte.num_embeddings = self.lm_head.out_features = config.padded_vocab
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        else:
            self.lm_head.weight = nn.Parameter(F.pad(self.lm_head.weight.detach(), (0, 0, 0, padding)))
        # log-probs of targets straight from the hidden states (kernels.linear_logprobs); the stages'
        # --fused_lm_head false turns it off: the logits first, then kernels.token_logprobs
        self.fused_lm_head = True
        # Checkpoints hold the vocab_size real rows only; the padding is a layout detail of this
        # process, added back on load.
        self.register_state_dict_post_hook(_cut_vocab_padding)
        self.register_load_state_dict_pre_hook(_add_vocab_padding)
        if config.lora_rank:  # a checkpoint of a model with adapters: the same adapters, to load into
            add_lora(self, config.lora_rank, config.lora_alpha, config.lora_targets)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights count once

    def forward(self, idx, attention_mask=None, *, start=0, targets=None, temperature=1.0, return_entropy=False):
        """idx: (B, T) token ids; attention_mask: (B, T), 1 = token, 0 = pad, or None when no row
        has a pad before a real token (then causal attention alone is right, and flash attention runs).
        Only positions from `start` on go through the head: T' = T - start outputs per row.
        Returns logits (B, T', vocab_size) for head="lm", or with targets (B, T') the fp32 log-probs
        of the targets under softmax(logits / temperature), and with return_entropy the tuple
        (log-probs, entropy), through kernels.linear_logprobs (the logits never held whole) or, with
        fused_lm_head False, the logits and kernels.token_logprobs (no fp32 copy of them);
        values (B, T') for head="scalar". The hidden states themselves: hidden_states()."""
        x = self.hidden_states(idx, attention_mask, start)  # (B, T', C)
        if self.score is not None:
            return self.score(x).squeeze(-1)  # (B, T')
        if targets is None:
            return self.lm_logits(x)  # (B, T', V)
        if self.fused_lm_head:  # the head's matmul and the log-softmax in one kernel (on CUDA): no (B, T', V) logits held
            return linear_logprobs(x, self.lm_head.weight[:self.config.vocab_size], targets, temperature=temperature,
                                   return_entropy=return_entropy)
        return token_logprobs(self.lm_logits(x), targets, temperature=temperature, return_entropy=return_entropy)

    def hidden_states(self, idx, attention_mask=None, start=0):
        """The final hidden states (B, T - start, n_embd), after the last norm: what a head reads.
        idx, attention_mask and start as in forward."""
        B, T = idx.shape
        assert T <= self.config.block_size, f"sequence of {T} > block_size {self.config.block_size}"
        if attention_mask is None:
            pos, allowed = torch.arange(T, device=idx.device)[None], None
        else:
            assert attention_mask.shape == (B, T), "attention_mask must be (B, T) like idx"
            pos, allowed = position_ids_from_mask(attention_mask), attention_allowed(attention_mask, T)
        return self.trunk(idx, pos, allowed)[:, start:]

    def trunk(self, idx, pos, allowed, caches=None):
        """Embeddings, blocks, final norm: (B, T) ids at positions pos -> (B, T, C) hidden states."""
        x = self.transformer.wte(idx)
        rope = None
        if self.config.arch == "gpt2":
            x = x + self.transformer.wpe(pos)
        else:
            rope = self.rope_cos[pos], self.rope_sin[pos]  # (B, T, head_dim / 2) each
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, allowed, rope, None if caches is None else caches[i])
        return self.transformer.ln_f(x)

    def lm_logits(self, x):
        """(..., C) -> (..., vocab_size): the head at the aligned padded width, the padding columns
        sliced off (a view: every softmax, log-prob and KL sees the real tokens alone)."""
        return self.lm_head(x)[..., :self.config.vocab_size]

    @torch.no_grad()
    def generate(self, idx, attention_mask, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None,
                 eos_id=None, n_vocab=None, use_cache=True, generator=None):
        """Sample continuations of a batch of left-padded prompts.
        idx, attention_mask: (B, P). Returns the new tokens (B, N), N <= max_new_tokens; a row
        that has produced eos_id is filled with eos_id afterwards, and sampling stops once
        every row has. n_vocab: sample only ids below it. use_cache=True runs the Sampler (static
        KV cache, eager here); use_cache=False recomputes the whole sequence each step: the slow
        reference that the Sampler is tested against."""
        assert self.config.head == "lm", "only a language-model head can generate"
        if use_cache:
            return Sampler(self, cuda_graph=False).generate(idx, attention_mask, max_new_tokens, temperature=temperature,
                                                            top_k=top_k, top_p=top_p, eos_id=eos_id, n_vocab=n_vocab,
                                                            generator=generator)
        seq, mask = idx, attention_mask
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        new = []
        for _ in range(max_new_tokens):
            logits = self(seq, mask)[:, -1]  # (B, V)
            next_token = sample_token(logits[:, :n_vocab].float(), temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:
                next_token = torch.where(done, eos_id, next_token)
                done = done | (next_token == eos_id)
            new.append(next_token)
            seq = torch.cat([seq, next_token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if done.all():
                break
        return torch.stack(new, dim=1)

    # ------------------------------------------------------------------ Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, path, head=None):
        """A GPT from a local Hugging Face directory of GPT2LMHeadModel, LlamaForCausalLM,
        Qwen2ForCausalLM or Qwen3ForCausalLM: config.json plus model.safetensors (or shards listed
        in model.safetensors.index.json, or pytorch_model.bin). head: "lm" or "scalar"; default
        "scalar" when the directory has the score head that save_pretrained writes beside a reward
        model's trunk, else "lm". A new scalar head starts as GPT.__init__ sets it. The tokenizer
        is the one config.json names in "minrlhf_tokenizer" (save_pretrained writes it), else
        GPT-2's for GPT-2 and the directory itself (its tokenizer.json) for the others."""
        hf = _read_hf_config(path)
        gpt2 = hf["model_type"] == "gpt2"
        has_score = os.path.exists(os.path.join(path, SCORE_FILE))
        head = head or ("scalar" if has_score else "lm")
        tokenizer = hf.get("minrlhf_tokenizer") or ("gpt2" if gpt2 else os.path.abspath(path))
        file = os.path.join(path, "config.json")
        config = GPTConfig(**(_gpt2_config(hf, file) if gpt2 else _llama_config(hf, file)),
                           dropout=0.0,  # GPT-2 trained with 0.1; RLHF runs with dropout off
                           head=head, tokenizer=tokenizer)
        if config.tokenizer == "gpt2" and config.vocab_size < GPT2_VOCAB:
            raise PretrainedError(f"{path}: its vocabulary of {config.vocab_size} tokens is smaller than GPT-2's "
                                  f"{GPT2_VOCAB}; set \"minrlhf_tokenizer\" in its config.json to the tokenizer it was trained with")
        model = cls(config)
        ours = model.state_dict()
        state = {}
        for hf_name, w in _read_hf_weights(path).items():
            name = _our_name(hf_name, config)
            if name is None:
                continue
            if name not in ours:
                raise PretrainedError(f"{path}: unexpected weight {hf_name!r}: not a {FAMILY[hf['model_type']]} language model")
            if gpt2 and name.endswith(CONV1D_WEIGHTS):
                w = w.t()  # GPT-2's Conv1D stores (in, out); nn.Linear stores (out, in)
            if w.shape != ours[name].shape:
                raise PretrainedError(f"{path}: weight {hf_name} has shape {tuple(w.shape)} but its config.json "
                                      f"implies {tuple(ours[name].shape)}")
            state[name] = w
        optional = ("score.weight", "score.bias") + (("lm_head.weight",) if config.tie_embeddings else ())
        missing = [k for k in ours if k not in state and k not in optional]
        if missing:
            raise PretrainedError(f"{path}: weight {_hf_name(missing[0], config)} is missing ({len(missing)} missing in all)")
        if head == "scalar" and has_score:
            from safetensors.torch import load_file
            state.update({"score." + k: v for k, v in load_file(os.path.join(path, SCORE_FILE)).items()})
        model.load_state_dict(state, strict=False)  # a tied lm_head is wte; a new scalar head keeps its init
        return model

    def save_pretrained(self, path):
        """Write a directory that transformers' from_pretrained loads as it is, as GPT2LMHeadModel,
        LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM (whichever the config is):
        config.json and model.safetensors, LoRA adapters merged into the weights. A tokenizer
        directory's files are copied beside them. A reward or value model writes the same trunk
        and its scalar head beside it, in score.safetensors, which GPT.from_pretrained reads back."""
        from safetensors.torch import save_file
        c = self.config
        hf = _gpt2_hf_config(c, path) if c.arch == "gpt2" else _llama_hf_config(c, path)
        os.makedirs(path, exist_ok=True)
        trunk = {}
        for name, w in merged_state_dict(self).items():
            if not name.startswith(("transformer.", "lm_head.")) or (name == "lm_head.weight" and c.tie_embeddings):
                continue  # a tied lm_head is wte, and transformers ties it back; the score goes apart
            trunk[_hf_name(name, c)] = (w.t() if name.endswith(CONV1D_WEIGHTS) and c.arch == "gpt2" else w
                                        ).detach().float().cpu().contiguous()
        if c.tokenizer not in ("task", "gpt2") and os.path.isdir(c.tokenizer):  # the tokenizer travels with the weights
            for file in TOKENIZER_FILES:
                src, dst = os.path.join(c.tokenizer, file), os.path.join(path, file)
                if os.path.exists(src) and not (os.path.exists(dst) and os.path.samefile(src, dst)):
                    shutil.copyfile(src, dst)
        else:
            hf["minrlhf_tokenizer"] = c.tokenizer  # read back by from_pretrained; transformers ignores it
        _atomic(os.path.join(path, "config.json"), lambda f: _write_json(f, hf))
        _atomic(os.path.join(path, "model.safetensors"), lambda f: save_file(trunk, f, metadata={"format": "pt"}))
        score_path = os.path.join(path, SCORE_FILE)
        if self.score is not None:
            head = {k: v.detach().float().cpu().contiguous() for k, v in self.score.state_dict().items()}
            _atomic(score_path, lambda f: save_file(head, f, metadata={"format": "pt"}))
        elif os.path.exists(score_path):
            os.remove(score_path)  # a policy saved over an old reward model's directory


def _cut_vocab_padding(module, state_dict, prefix, local_metadata):
    # tied: one clone shared by both names, so a checkpoint stores the embedding once
    real = None
    for k in (prefix + "transformer.wte.weight", prefix + "lm_head.weight"):
        if k in state_dict:
            if real is None or not module.config.tie_embeddings:
                real = state_dict[k][:module.config.vocab_size].clone()
            state_dict[k] = real


def _add_vocab_padding(module, state_dict, prefix, *args):
    for k in (prefix + "transformer.wte.weight", prefix + "lm_head.weight"):
        w = state_dict.get(k)
        if w is not None and w.size(0) < module.config.padded_vocab:
            state_dict[k] = torch.cat([w, w.new_zeros(module.config.padded_vocab - w.size(0), w.size(1))])


class Sampler:
    """Sampling from a GPT without CPU overhead: gpt-fast's recipe, for left-padded batches.

    - The weights in the compute dtype (bf16 on a GPU), LoRA adapters merged into them: a copy
      refreshed in place once per rollout by load(), so autocast does not cast every weight again
      at every decode step and no adapter costs a matmul of its own.
    - A static KV cache: the prompt goes through in one forward (prefill) that fills columns
      0..P-1; each decode step writes one column and attends to all L columns, the mask choosing
      the real ones. The mask, the positions and the column come from buffers on the device that
      the step itself advances, so every step has the same shapes and needs no host.
    - On CUDA the decode step is captured once per (batch, L) as a CUDA graph and replayed; L is
      P + max_new_tokens rounded up to 64, so a new prompt width rarely means a new capture.
    - Sampling and the EOS check stay on the device; the host looks once every 16 tokens.
    The naive loop (GPT.generate with use_cache=False) is the reference it is tested against.
    The model is used as it is (eval mode is the caller's): dropout is 0 in RLHF anyway."""

    def __init__(self, model, dtype=None, cuda_graph=True):
        weight = model.transformer.wte.weight
        if (dtype is None or dtype == weight.dtype) and not has_lora(model):
            self.model = model
        else:  # a copy in the compute dtype, any LoRA adapters merged into its weights: plain matmuls
            self.model = merge_lora(copy.deepcopy(model)).to(dtype or weight.dtype).eval().requires_grad_(False)
        self.cuda_graph = cuda_graph and weight.is_cuda
        self.B = self.capacity = None  # the static buffers' batch size and length
        self.graphs = {}  # L -> (graph, its static logits)

    @torch.no_grad()
    def load(self, model):
        """Copy the model's current weights into the sampling copy, in place, so that captured
        graphs (which hold the copy's addresses) stay valid; LoRA adapters merged on the way, one
        layer at a time."""
        model = getattr(model, "module", model)  # unwrap DDP
        if model is self.model:
            return
        theirs = dict(model.named_modules())
        for name, mine in self.model.named_parameters():
            module_name, _, param = name.rpartition(".")
            module = theirs[module_name]
            mine.copy_(module.merged_weight() if param == "weight" and isinstance(module, Linear) else getattr(module, param))

    def _buffers(self, B, L):
        if B == self.B and L <= self.capacity:
            return
        c, weight = self.model.config, self.model.transformer.wte.weight
        shape = (B, c.n_kv_head, L, c.head_dim)  # GQA: the cache holds the key/value heads alone
        # zeros, not empty: a masked-out key still meets its value in attention (0 * NaN is NaN)
        self.kv = [(weight.new_zeros(shape), weight.new_zeros(shape)) for _ in range(c.n_layer)]
        self.key_mask = torch.ones(B, L, dtype=torch.bool, device=weight.device)  # real prompt token or new token
        self.cols = torch.arange(L, device=weight.device)
        self.token = torch.zeros(B, 1, dtype=torch.long, device=weight.device)  # the decode step's input
        self.pos = torch.zeros(B, dtype=torch.long, device=weight.device)  # its position in each row
        self.col = torch.zeros(1, dtype=torch.long, device=weight.device)  # its column in the cache
        self.B, self.capacity, self.graphs = B, L, {}

    def _step(self, L):
        """One decode step of fixed shapes: self.token at self.pos into column self.col, then
        advance both. Returns the next-token logits (B, vocab_size)."""
        allowed = (self.key_mask[:, :L] & (self.cols[:L] <= self.col))[:, None, None, :]  # (B, 1, 1, L)
        caches = [(k[:, :, :L], v[:, :, :L], self.col) for k, v in self.kv]
        x = self.model.trunk(self.token, self.pos[:, None], allowed, caches)  # (B, 1, C)
        self.pos += 1
        self.col += 1
        return self.model.lm_logits(x[:, -1])

    def _decode(self, L):
        if not self.cuda_graph:
            return self._step(L)
        if L not in self.graphs:
            # CUDA graphs want their code warmed up on a side stream first (PyTorch's CUDA
            # semantics notes); the warm-up steps advance the counters, so they are put back.
            col, pos = self.col.clone(), self.pos.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(L)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._step(L)
            self.col.copy_(col)
            self.pos.copy_(pos)
            self.graphs[L] = (graph, logits)
        graph, logits = self.graphs[L]
        graph.replay()
        return logits

    @torch.no_grad()
    def generate(self, idx, attention_mask, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                 n_vocab=None, generator=None):
        """As GPT.generate: (B, P) left-padded prompts -> (B, N) new tokens, EOS-filled after a row's EOS."""
        model = self.model
        B, P = idx.shape
        assert P + max_new_tokens <= model.config.block_size, \
            f"prompt of {P} + {max_new_tokens} new tokens > block_size {model.config.block_size}"
        L = min(model.config.block_size, -(-(P + max_new_tokens) // 64) * 64)
        self._buffers(B, L)
        self.key_mask[:, :P] = attention_mask.bool()
        self.key_mask[:, P:] = True
        self.pos.copy_(attention_mask.sum(1))  # the first new token's position: the prompt's length
        self.col.fill_(P)
        # prefill: the whole prompt in one forward, filling cache columns 0..P-1
        caches = [(k, v, None) for k, v in self.kv]
        x = model.trunk(idx, position_ids_from_mask(attention_mask), attention_allowed(attention_mask, P), caches)
        logits = model.lm_logits(x[:, -1])  # (B, V)
        out = torch.full((B, max_new_tokens), 0 if eos_id is None else eos_id, dtype=torch.long, device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for i in range(max_new_tokens):
            token = sample_token(logits[:, :n_vocab].float(), temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:
                token = torch.where(done, eos_id, token)
                done |= token == eos_id
            out[:, i] = token
            if i == max_new_tokens - 1 or (eos_id is not None and i % 16 == 15 and done.all()):
                break  # done.all() is the loop's only host sync, once every 16 tokens
            self.token.copy_(token[:, None])
            logits = self._decode(L)
        if eos_id is not None:  # as the naive loop: stop at the step where the last row ended
            is_eos = out == eos_id
            first = torch.where(is_eos.any(1), is_eos.long().argmax(1), max_new_tokens - 1)
            out = out[:, :int(first.max()) + 1]
        return out


def sample_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits: (B, V) -> (B,) token ids. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # nucleus sampling (Holtzman et al. 2019): keep the smallest set whose mass reaches top_p
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before this token already reached top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    # argmax of p_i / E_i with E_i ~ Exp(1) is token i with probability p_i, as torch.multinomial
    # draws, but with no host sync (gpt-fast's multinomial_sample_one_no_sync)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(-1)


# ----------------------------------------------------------------------------- LoRA

# the attention projections of each block (Hu et al. 2021 adapted W_q and W_v; PEFT's examples all four)
LORA_TARGETS = {"gpt2": ("attn.c_attn", "attn.c_proj"), "llama": ("q_proj", "k_proj", "v_proj", "o_proj")}
PROJECTIONS = {"gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
               "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


def add_lora(model, rank, alpha=None, targets=None):
    """Give the named projections of every block a LoRA adapter (Hu et al. 2021) and freeze
    everything else: afterwards only the adapters require grad. Returns them, the parameters to
    optimise; a reward or value model's scalar head stays frozen unless the caller adds it
    (model.score.requires_grad_(True)). alpha: the update is scaled by alpha / rank (default
    alpha = rank). targets: projection names, each matching every module whose name ends with it
    ("c_proj" is both of GPT-2's, "attn.c_proj" the attention's alone); default the attention's
    (LORA_TARGETS). The adapters start at zero (B = 0), so the model's outputs do not move.
    The config records rank, alpha and targets, so GPT(config) rebuilds them to load a checkpoint."""
    c = model.config
    assert rank > 0 and not has_lora(model), "add_lora takes a rank > 0, once per model"
    alpha = float(alpha or rank)
    targets = tuple(targets or LORA_TARGETS[c.arch])
    layers = []
    for target in targets:
        found = [m for name, m in model.named_modules() if isinstance(m, Linear) and (name + ".").endswith("." + target + ".")]
        if not found:
            raise ValueError(f"no projection {target!r} to put a LoRA adapter on; a {c.arch} block has "
                             f"{', '.join(PROJECTIONS[c.arch])}")
        layers += [m for m in found if m not in layers]
    model.requires_grad_(False)
    for layer in layers:
        layer.add_adapter(rank, alpha)
    c.lora_rank, c.lora_alpha, c.lora_targets = rank, alpha, targets
    return [p for layer in layers for p in (layer.lora_A, layer.lora_B)]


def has_lora(model):
    return any(isinstance(m, Linear) and m.lora_A is not None for m in model.modules())


@contextlib.contextmanager
def lora_disabled(model):
    """Inside, the model computes with its base weights alone: a LoRA policy is its own frozen
    reference (PPO's KL, DPO's reference log-probs) with no second copy in memory."""
    layers = [m for m in model.modules() if isinstance(m, Linear) and m.lora_A is not None]
    for layer in layers:
        layer.lora_enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.lora_enabled = True


class Reference:
    """A LoRA model's base weights as a frozen model of their own: calling it runs the model with
    its adapters off. PPO's and DPO's reference, when it is the policy's starting point, is this:
    no second copy of the weights is held."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def __call__(self, *args, **kwargs):
        with lora_disabled(self.model):
            return self.model(*args, **kwargs)

    def parameters(self):
        return self.model.parameters()

    def eval(self):
        return self  # the policy's mode is its trainer's; dropout is 0 in RLHF anyway


@torch.no_grad()
def merge_lora(model):
    """Fold each adapter into its weight, W + (alpha / r) B A, and remove the adapters, in place:
    the plain model that computes what the adapted one did. requires_grad is left as it was.
    Returns the model."""
    for m in model.modules():
        if isinstance(m, Linear) and m.lora_A is not None:
            m.weight.copy_(m.merged_weight())
            m.lora_A = m.lora_B = None
    c = getattr(model, "module", model).config
    c.lora_rank, c.lora_alpha, c.lora_targets = 0, 0.0, ()
    return model


def merged_state_dict(model):
    """model.state_dict() with every adapter folded into its weight and the adapters left out: the
    checkpoint of the plain model (save_pretrained writes it). The model is not changed."""
    state = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, Linear) and m.lora_A is not None:
            prefix = name + "." if name else ""
            state[prefix + "weight"] = m.merged_weight().detach()
            del state[prefix + "lora_A"], state[prefix + "lora_B"]
    return state


def lora_state_dict(model):
    """The adapters alone (lora_A, lora_B of each adapted projection): small enough to keep many.
    model.load_state_dict(it, strict=False) puts them back on a model given the same add_lora."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


# ----------------------------------------------------------------------------- Hugging Face checkpoint files

GPT2_VOCAB = 50257  # GPT-2's tokenizer: 50,000 merges + 256 bytes + <|endoftext|>
SCORE_FILE = "score.safetensors"  # a reward / value model's head, beside its trunk
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM"}  # model_type -> the class model.py reads and writes
FAMILY = {"gpt2": "GPT-2", "llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}
# Hugging Face's names of the llama block's weights -> ours; {} is a layer number
LLAMA_NAMES = [("model.embed_tokens.", "transformer.wte."),
               ("model.norm.", "transformer.ln_f."),
               ("model.layers.{}.input_layernorm.", "transformer.h.{}.ln_1."),
               ("model.layers.{}.post_attention_layernorm.", "transformer.h.{}.ln_2."),
               ("model.layers.{}.self_attn.", "transformer.h.{}.attn."),
               ("model.layers.{}.mlp.", "transformer.h.{}.mlp."),
               ("lm_head.", "lm_head.")]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")  # what save_pretrained copies from a tokenizer directory


class PretrainedError(ValueError):
    """A Hugging Face directory that cannot be loaded or written; str(e) says why in one sentence."""


def _read_hf_config(path):
    """config.json of a Hugging Face directory, checked to be a family model.py implements."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise PretrainedError(f"{path}: no config.json, so not a Hugging Face model directory")
    with open(file) as f:
        hf = json.load(f)
    model_type, architectures = hf.get("model_type"), hf.get("architectures") or []
    supported = ", ".join(HF_CLASSES.values())
    if model_type not in HF_CLASSES:
        raise PretrainedError(f"{file}: model_type is {model_type!r}; only these can be loaded: {supported}")
    for cls in architectures:
        if cls != HF_CLASSES[model_type]:
            other = next((t for t, c in HF_CLASSES.items() if c == cls), None)
            if other is not None:
                raise PretrainedError(f"{file}: model_type is {model_type!r}; only {FAMILY[other]} has architectures "
                                      f"{architectures}, so config.json contradicts itself")
            raise PretrainedError(f"{file}: architectures {architectures} is not supported; only these can be loaded: {supported}")
    return hf


def _gpt2_config(hf, file):
    """GPTConfig fields of a GPT-2 config.json, refusing what GPT-2's code can switch but model.py
    does not implement; each default is GPT-2's own."""
    for key, default, ok in [("activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh")),
                             ("scale_attn_weights", True, (True,)),
                             ("scale_attn_by_inverse_layer_idx", False, (False,)),
                             ("add_cross_attention", False, (False,)),
                             ("tie_word_embeddings", True, (True,))]:
        if hf.get(key, default) not in ok:
            raise PretrainedError(f"{file}: {key} = {hf[key]!r} is not supported (GPT-2 uses {ok[0]!r})")
    hf = {"n_positions": 1024, "vocab_size": GPT2_VOCAB, "n_layer": 12, "n_head": 12, "n_embd": 768, **hf}
    return dict(arch="gpt2", block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                n_head=hf["n_head"], n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner"),
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True)


def _llama_config(hf, file):
    """GPTConfig fields of a Llama, Qwen2 or Qwen3 config.json; the defaults are transformers'."""
    model_type = hf["model_type"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise PretrainedError(f"{file}: has no {key}, which a {FAMILY[model_type]} config needs")
    for key, ours in [("hidden_act", "silu"), ("mlp_bias", False), ("use_sliding_window", False),
                      ("partial_rotary_factor", 1.0)]:
        if hf.get(key, ours) != ours:
            raise PretrainedError(f"{file}: {key} = {hf[key]!r} is not supported (only {ours!r} is)")
    if any(kind != "full_attention" for kind in hf.get("layer_types") or []):
        raise PretrainedError(f"{file}: layer_types {hf['layer_types']} has sliding-window layers, which are not supported")
    block_size = hf.get("max_position_embeddings", 2048 if model_type == "llama" else 32768)
    # transformers 5 writes rope_parameters (rope_theta inside); older files rope_theta and rope_scaling
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    if any(isinstance(v, dict) for v in rope.values()):
        raise PretrainedError(f"{file}: RoPE parameters per layer type are not supported")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3") or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise PretrainedError(f"{file}: RoPE {rope} is not supported (rope_type default or llama3 is)")
    scaling = None if rope_type == "default" else {
        "rope_type": "llama3", "factor": rope["factor"], "low_freq_factor": rope["low_freq_factor"],
        "high_freq_factor": rope["high_freq_factor"],
        "original_max_position_embeddings": rope.get("original_max_position_embeddings", block_size)}
    attention_bias = hf.get("attention_bias", False)  # Llama and Qwen3: on q, k, v and o at once
    return dict(arch="llama", block_size=block_size, vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"], n_kv_head=hf.get("num_key_value_heads"),
                head_dim=hf.get("head_dim") or (128 if model_type == "qwen3" else None),
                intermediate_size=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                tie_embeddings=hf.get("tie_word_embeddings", False),
                rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)), rope_scaling=scaling,
                qkv_bias=model_type == "qwen2" or attention_bias, o_bias=model_type != "qwen2" and attention_bias,
                qk_norm=model_type == "qwen3")


def _gpt2_hf_config(c, path):
    if not c.bias:
        raise PretrainedError(f"{path}: GPT-2 has biases everywhere, so a model with bias=False cannot be saved in its layout")
    hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
          "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd,
          "n_layer": c.n_layer, "n_head": c.n_head,
          "n_inner": None if c.intermediate_size == 4 * c.n_embd else c.intermediate_size,
          "layer_norm_epsilon": c.norm_eps, "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
          "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
          "tie_word_embeddings": True, "initializer_range": 0.02, "dtype": "float32"}
    if c.tokenizer == "gpt2":
        hf.update(bos_token_id=GPT2_VOCAB - 1, eos_token_id=GPT2_VOCAB - 1)  # <|endoftext|>
    return hf


def _llama_hf_config(c, path):
    """config.json of the family whose options the config uses: Qwen3 (q/k norm), Qwen2 (q/k/v
    biases without an output bias), else Llama."""
    if c.qk_norm:
        model_type = "qwen3"
    elif c.qkv_bias and not c.o_bias:
        model_type = "qwen2"
    else:
        model_type = "llama"
    if model_type != "qwen2" and c.qkv_bias != c.o_bias:
        raise PretrainedError(f"{path}: {FAMILY[model_type]} has one attention_bias for q, k, v and o, so qkv_bias "
                              f"{c.qkv_bias} with o_bias {c.o_bias} cannot be saved in its layout")
    hf = {"architectures": [HF_CLASSES[model_type]], "model_type": model_type, "vocab_size": c.vocab_size,
          "hidden_size": c.n_embd, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.n_layer,
          "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
          "hidden_act": "silu", "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps,
          "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "tie_word_embeddings": c.tie_embeddings,
          "attention_dropout": c.dropout, "initializer_range": 0.02, "dtype": "float32",
          "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if model_type == "qwen2":
        hf["use_sliding_window"] = False
    else:
        hf["attention_bias"] = c.qkv_bias
    if c.tokenizer not in ("task", "gpt2") and os.path.isfile(os.path.join(c.tokenizer, "config.json")):
        # the special ids of the directory the model came from
        with open(os.path.join(c.tokenizer, "config.json")) as f:
            source = json.load(f)
        hf.update({k: source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in source})
    return hf


def _rename(name, table, to_ours):
    """Map a weight's name through a table of (Hugging Face prefix, our prefix); None if none fits."""
    for hf_prefix, our_prefix in table:
        src, dst = (hf_prefix, our_prefix) if to_ours else (our_prefix, hf_prefix)
        m = re.match(re.escape(src).replace(re.escape("{}"), r"(\d+)"), name)
        if m:
            return dst.replace("{}", m.group(1) if m.groups() else "") + name[m.end():]
    return None


def _our_name(hf_name, config):
    """Our name for a Hugging Face weight, or None for one that is not read."""
    if config.arch == "gpt2":
        if hf_name == "lm_head.weight" or re.fullmatch(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias", hf_name):
            return None  # lm_head is tied to wte; the others are old transformers versions' causal-mask buffers
        return hf_name if hf_name.startswith("transformer.") else "transformer." + hf_name  # GPT2Model saves without the prefix
    if (hf_name == "lm_head.weight" and config.tie_embeddings) or hf_name.endswith("rotary_emb.inv_freq"):
        return None  # some files hold the tied head anyway; old ones RoPE's frequencies
    return _rename(hf_name, LLAMA_NAMES, to_ours=True) or hf_name


def _hf_name(name, config):
    """Hugging Face's name for one of our weights."""
    return name if config.arch == "gpt2" else _rename(name, LLAMA_NAMES, to_ours=False)


def _read_hf_weights(path):
    """name -> tensor from model.safetensors (one file or shards) or pytorch_model.bin."""
    from safetensors.torch import load_file
    one, index, pt = (os.path.join(path, f) for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))
    if os.path.exists(one):
        return load_file(one)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(os.path.join(path, shard)).items()}
    if os.path.exists(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)  # no code runs on load
    raise PretrainedError(f"{path}: has config.json but no model.safetensors or pytorch_model.bin")


def _atomic(path, write):
    """write(tmp) then rename, so a crash mid-write never leaves a broken file."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def _write_json(file, obj):
    with open(file, "w") as f:
        json.dump(obj, f, indent=2)
