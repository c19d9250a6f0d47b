"""
The one GPT of minRLHF: GPT-2's architecture (learned positions, pre-LayerNorm, GELU, tied
embeddings) with GPT-2's parameter names, so imported weights map one to one.

The same trunk serves every stage: with `head="lm"` it is the policy (logits over the
vocabulary); with `head="scalar"` it is the reward or value model (one number per position,
a Linear(n_embd, 1) on the final hidden state).

Batches of prompts are LEFT-padded, so that every prompt ends at the same column and
generation appends to all rows at once. Padding never changes a real token's output:
position ids come from the attention mask (a row's first real token is position 0), and no
real token attends to a pad.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (prompt + response) the model sees
    vocab_size: int = 50257  # GPT-2's; the built-in task's tokenizer is far smaller
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # RLHF runs with dropout off everywhere (N+ implementation details)
    bias: bool = True  # GPT-2 has biases in Linear and LayerNorm
    head: str = "lm"  # "lm": next-token logits; "scalar": one value per position (reward, value)
    tokenizer: str = "gpt2"  # which tokenizer the embeddings belong to; stages refuse mismatches


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, allowed, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, T_past + T, hd)
        # allowed: (B, 1, T, T_past + T), True where query t may attend to key s
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, allowed, cache=None):
        x = x + self.attn(self.ln_1(x), allowed, cache)  # pre-LayerNorm, as GPT-2
        x = x + self.mlp(self.ln_2(x))
        return x


class LayerCache:
    """Keys and values of one layer, preallocated for the whole generation."""

    def __init__(self, B, n_head, max_len, head_dim, dtype, device):
        self.k = torch.empty(B, n_head, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k, v):
        T = k.size(2)
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


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
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        # reward / value models: the same trunk with one scalar out of the last hidden state
        self.score = nn.Linear(config.n_embd, 1) if config.head == "scalar" else None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2 scales residual projections by 1/sqrt(2 * n_layer)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if self.score is not None:  # N+ implementation details: std 1/sqrt(n_embd + 1), bias 0
            nn.init.normal_(self.score.weight, std=1 / math.sqrt(config.n_embd + 1))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights count once

    def forward(self, idx, attention_mask=None, *, cache=None, return_hidden=False):
        """idx: (B, T) token ids; attention_mask: (B, T_past + T), 1 = token, 0 = pad (None: no pads).
        With a cache, idx holds only the new tokens and the cache the T_past before them.
        Returns logits (B, T, V) for head="lm", values (B, T) for head="scalar",
        or the final hidden states (B, T, n_embd) with return_hidden=True."""
        B, T = idx.shape
        T_past = cache[0].length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, T_past + T, dtype=torch.long, device=idx.device)
        assert attention_mask.shape == (B, T_past + T), "attention_mask must cover past and new tokens"
        assert T_past + T <= self.config.block_size, f"sequence of {T_past + T} > block_size {self.config.block_size}"
        pos = position_ids_from_mask(attention_mask)[:, T_past:]  # (B, T)
        allowed = attention_allowed(attention_mask, T)  # (B, 1, T, T_past + T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, allowed, cache[i] if cache is not None else None)
        x = self.transformer.ln_f(x)
        if return_hidden:
            return x
        if self.score is not None:
            return self.score(x).squeeze(-1)  # (B, T)
        return self.lm_head(x)  # (B, T, V)

    def new_cache(self, B, max_len):
        c = self.config
        p = self.transformer.wte.weight
        return [LayerCache(B, c.n_head, max_len, c.n_embd // c.n_head, p.dtype, p.device) for _ in range(c.n_layer)]

    @torch.no_grad()
    def generate(self, idx, attention_mask, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None,
                 eos_id=None, use_cache=True, generator=None):
        """Sample continuations of a batch of left-padded prompts.
        idx, attention_mask: (B, P). Returns the new tokens (B, N), N <= max_new_tokens; a row
        that has produced eos_id is filled with eos_id afterwards, and sampling stops once
        every row has. use_cache=False recomputes the whole sequence each step: the slow
        reference that the KV-cache path is tested against."""
        assert self.config.head == "lm", "only a language-model head can generate"
        B, P = idx.shape
        cache = self.new_cache(B, P + max_new_tokens) if use_cache else None
        seq, mask = idx, attention_mask
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        new = []
        for _ in range(max_new_tokens):
            if cache is None:
                logits = self(seq, mask)[:, -1]  # (B, V)
            else:
                step_input = seq if not new else seq[:, -1:]  # the whole prompt first, then one token
                logits = self(step_input, mask, cache=cache)[:, -1]
            next_token = sample_token(logits.float(), temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:
                next_token = torch.where(done, torch.full_like(next_token, eos_id), next_token)
                done = done | (next_token == eos_id)
            new.append(next_token)
            seq = torch.cat([seq, next_token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if done.all():
                break
        return torch.stack(new, dim=1)


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
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
