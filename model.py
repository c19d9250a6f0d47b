"""
The one GPT of minRLHF: GPT-2's architecture (learned positions, pre-LayerNorm, GELU, tied
embeddings) with GPT-2's parameter names, so imported weights map one to one.

The same trunk serves every stage: with `head="lm"` it is the policy (logits over the
vocabulary, or straight to the log-probs of given targets); with `head="scalar"` it is the
reward or value model (one number per position, a Linear(n_embd, 1) on the final hidden state).

Batches of prompts are LEFT-padded, so that every prompt ends at the same column and
generation appends to all rows at once. Padding never changes a real token's output:
position ids come from the attention mask (a row's first real token is position 0), and no
real token attends to a pad. A batch with no left pads (right-padded, or none at all) passes
attention_mask=None: causal attention alone already keeps real tokens off the pads after them.

Fast generation (the Sampler below) follows gpt-fast: a static KV cache, the prompt prefilled in
one forward, then a decode step of fixed shapes that a CUDA graph replays.
"""

import copy
import json
import math
import os
import re
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
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # RLHF runs with dropout off everywhere (N+ implementation details)
    bias: bool = True  # GPT-2 has biases in Linear and LayerNorm
    head: str = "lm"  # "lm": next-token logits; "scalar": one value per position (reward, value)
    tokenizer: str = "gpt2"  # which tokenizer the embeddings belong to; stages refuse mismatches

    @property
    def padded_vocab(self):
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


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
        """allowed: (B, 1, T, S) bool, True where query t may attend to key s; None: causal only.
        cache: (k, v, col) while generating: the layer's static (B, nh, L, hd) buffers and where
        to write this call's keys: col None writes columns 0..T-1 (the prompt) and attends to
        them alone; a 1-element tensor writes that column and attends to every column, the mask
        choosing (a decode step: the same shapes every step)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        if cache is not None:
            k_cache, v_cache, col = cache
            if col is None:
                k_cache[:, :, :T], v_cache[:, :, :T] = k, v
            else:
                k_cache.index_copy_(2, col, k)  # a device tensor, so no host sync and graph-safe
                v_cache.index_copy_(2, col, v)
                k, v = k_cache, v_cache  # (B, nh, L, hd)
        dropout = self.attn_dropout if self.training else 0.0
        with sdpa_kernel(ATTENTION_BACKENDS):
            if allowed is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
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
        # Padding rows, zero: never looked up, cut from every softmax. Added after the random init,
        # so that a seed gives the same model whatever the padding (a layout detail).
        padding = config.padded_vocab - config.vocab_size
        self.transformer.wte.weight = nn.Parameter(F.pad(self.transformer.wte.weight.detach(), (0, 0, 0, padding)))
        self.transformer.wte.num_embeddings = self.lm_head.out_features = config.padded_vocab
        self.lm_head.weight = self.transformer.wte.weight
        # log-probs of targets straight from the hidden states (kernels.linear_logprobs); the stages'
        # --fused_lm_head false turns it off: the logits first, then kernels.token_logprobs
        self.fused_lm_head = True
        # Checkpoints hold the vocab_size real rows only; the padding is a layout detail of this
        # process, added back on load.
        self.register_state_dict_post_hook(_cut_vocab_padding)
        self.register_load_state_dict_pre_hook(_add_vocab_padding)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights count once

    def forward(self, idx, attention_mask=None, *, start=0, targets=None, temperature=1.0, return_entropy=False,
                return_hidden=False):
        """idx: (B, T) token ids; attention_mask: (B, T), 1 = token, 0 = pad, or None when no row
        has a pad before a real token (then causal attention alone is right, and flash attention runs).
        Only positions from `start` on go through the head: T' = T - start outputs per row.
        Returns logits (B, T', vocab_size) for head="lm", or with targets (B, T') the fp32 log-probs
        of the targets under softmax(logits / temperature), and with return_entropy the tuple
        (log-probs, entropy), through kernels.linear_logprobs (the logits never held whole) or, with
        fused_lm_head False, the logits and kernels.token_logprobs (no fp32 copy of them);
        values (B, T') for head="scalar"; the final hidden states (B, T', n_embd) with return_hidden=True."""
        B, T = idx.shape
        assert T <= self.config.block_size, f"sequence of {T} > block_size {self.config.block_size}"
        if attention_mask is None:
            pos, allowed = torch.arange(T, device=idx.device)[None], None
        else:
            assert attention_mask.shape == (B, T), "attention_mask must be (B, T) like idx"
            pos, allowed = position_ids_from_mask(attention_mask), attention_allowed(attention_mask, T)
        x = self.trunk(idx, pos, allowed)[:, start:]  # (B, T', C)
        if return_hidden:
            return x
        if self.score is not None:
            return self.score(x).squeeze(-1)  # (B, T')
        if targets is None:
            return self.lm_logits(x)  # (B, T', V)
        if self.fused_lm_head:  # the head's matmul and the log-softmax in one kernel (on CUDA): no (B, T', V) logits held
            return linear_logprobs(x, self.lm_head.weight[:self.config.vocab_size], targets, temperature=temperature,
                                   return_entropy=return_entropy)
        return token_logprobs(self.lm_logits(x), targets, temperature=temperature, return_entropy=return_entropy)

    def trunk(self, idx, pos, allowed, caches=None):
        """Embeddings, blocks, final LayerNorm: (B, T) ids at positions pos -> (B, T, C) hidden states."""
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, allowed, None if caches is None else caches[i])
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

    # ------------------------------------------------------------------ GPT-2 checkpoints (Hugging Face layout)

    @classmethod
    def from_pretrained(cls, path, head=None):
        """A GPT from a local Hugging Face GPT-2 directory: config.json plus model.safetensors
        (or shards listed in model.safetensors.index.json, or pytorch_model.bin). Any GPT-2 size
        or a custom config of the same architecture. head: "lm" or "scalar"; default "scalar"
        when the directory has the score head that save_pretrained writes beside a reward
        model's trunk, else "lm". A new scalar head starts as GPT.__init__ sets it."""
        hf = _read_hf_config(path)
        has_score = os.path.exists(os.path.join(path, SCORE_FILE))
        head = head or ("scalar" if has_score else "lm")
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"],
                           dropout=0.0,  # GPT-2 trained with 0.1; RLHF runs with dropout off
                           bias=True, head=head, tokenizer=hf.get("minrlhf_tokenizer", "gpt2"))
        if config.tokenizer == "gpt2" and config.vocab_size < GPT2_VOCAB:
            raise PretrainedError(f"{path}: its vocabulary of {config.vocab_size} tokens is smaller than GPT-2's "
                                  f"{GPT2_VOCAB}; set \"minrlhf_tokenizer\" in its config.json to the tokenizer it was trained with")
        model = cls(config)
        ours = model.state_dict()
        state = {}
        for name, w in _read_hf_weights(path).items():
            if name == "lm_head.weight" or re.fullmatch(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias", name):
                continue  # lm_head is tied to wte; the others are old transformers versions' causal-mask buffers
            name = name if name.startswith("transformer.") else "transformer." + name  # GPT2Model saves without the prefix
            if name not in ours:
                raise PretrainedError(f"{path}: unexpected weight {name!r}: not a GPT-2 language model")
            if name.endswith(CONV1D_WEIGHTS):
                w = w.t()  # GPT-2's Conv1D stores (in, out); nn.Linear stores (out, in)
            if w.shape != ours[name].shape:
                raise PretrainedError(f"{path}: weight {name} has shape {tuple(w.shape)} but its config.json "
                                      f"implies {tuple(ours[name].shape)}")
            state[name] = w
        missing = [k for k in ours if k not in state and k not in ("lm_head.weight", "score.weight", "score.bias")]
        if missing:
            raise PretrainedError(f"{path}: weight {missing[0]} is missing ({len(missing)} missing in all)")
        if head == "scalar" and has_score:
            from safetensors.torch import load_file
            state.update({"score." + k: v for k, v in load_file(os.path.join(path, SCORE_FILE)).items()})
        model.load_state_dict(state, strict=False)  # lm_head is wte; a new scalar head keeps its init
        return model

    def save_pretrained(self, path):
        """Write a directory that Hugging Face's GPT2LMHeadModel.from_pretrained loads as it is:
        config.json and model.safetensors. A reward or value model writes the same trunk and its
        scalar head beside it, in score.safetensors, which GPT.from_pretrained reads back."""
        from safetensors.torch import save_file
        c = self.config
        if not c.bias:
            raise PretrainedError(f"{path}: GPT-2 has biases everywhere, so a model with bias=False cannot be saved in its layout")
        os.makedirs(path, exist_ok=True)
        trunk = {}
        for name, w in self.state_dict().items():
            if not name.startswith("transformer."):
                continue  # lm_head is tied to wte, and transformers ties it back; the score goes apart
            trunk[name] = (w.t() if name.endswith(CONV1D_WEIGHTS) else w).detach().float().cpu().contiguous()
        hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
              "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd,
              "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None, "layer_norm_epsilon": 1e-5,
              "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
              "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
              "tie_word_embeddings": True, "initializer_range": 0.02, "dtype": "float32",
              "minrlhf_tokenizer": c.tokenizer}  # read back by from_pretrained; transformers ignores it
        if c.tokenizer == "gpt2":
            hf.update(bos_token_id=GPT2_VOCAB - 1, eos_token_id=GPT2_VOCAB - 1)  # <|endoftext|>
        _atomic(os.path.join(path, "config.json"), lambda f: _write_json(f, hf))
        _atomic(os.path.join(path, "model.safetensors"), lambda f: save_file(trunk, f, metadata={"format": "pt"}))
        score_path = os.path.join(path, SCORE_FILE)
        if self.score is not None:
            head = {k: v.detach().float().cpu().contiguous() for k, v in self.score.state_dict().items()}
            _atomic(score_path, lambda f: save_file(head, f, metadata={"format": "pt"}))
        elif os.path.exists(score_path):
            os.remove(score_path)  # a policy saved over an old reward model's directory



def _cut_vocab_padding(module, state_dict, prefix, local_metadata):
    # one clone shared by the tied names, so a checkpoint stores the embedding once
    keys = [prefix + k for k in ("transformer.wte.weight", "lm_head.weight") if prefix + k in state_dict]
    if keys:
        real = state_dict[keys[0]][:module.config.vocab_size].clone()
        for k in keys:
            state_dict[k] = real


def _add_vocab_padding(module, state_dict, prefix, *args):
    for k in (prefix + "transformer.wte.weight", prefix + "lm_head.weight"):
        w = state_dict.get(k)
        if w is not None and w.size(0) < module.config.padded_vocab:
            state_dict[k] = torch.cat([w, w.new_zeros(module.config.padded_vocab - w.size(0), w.size(1))])


class Sampler:
    """Sampling from a GPT without CPU overhead: gpt-fast's recipe, for left-padded batches.

    - The weights in the compute dtype (bf16 on a GPU): a copy refreshed in place once per rollout
      by load(), so autocast does not cast every weight again at every decode step.
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
        if dtype is None or dtype == weight.dtype:
            self.model = model
        else:
            self.model = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
        self.cuda_graph = cuda_graph and weight.is_cuda
        self.B = self.capacity = None  # the static buffers' batch size and length
        self.graphs = {}  # L -> (graph, its static logits)

    @torch.no_grad()
    def load(self, model):
        """Copy the model's current weights into the sampling copy, in place, so that captured
        graphs (which hold the copy's addresses) stay valid."""
        if model is not self.model:
            for mine, theirs in zip(self.model.parameters(), model.parameters()):
                mine.copy_(theirs)

    def _buffers(self, B, L):
        if B == self.B and L <= self.capacity:
            return
        c, weight = self.model.config, self.model.transformer.wte.weight
        shape = (B, c.n_head, L, c.n_embd // c.n_head)
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


# ----------------------------------------------------------------------------- GPT-2 checkpoint files

GPT2_VOCAB = 50257  # GPT-2's tokenizer: 50,000 merges + 256 bytes + <|endoftext|>
SCORE_FILE = "score.safetensors"  # a reward / value model's head, beside its GPT-2 trunk
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class PretrainedError(ValueError):
    """A GPT-2 directory that cannot be loaded or written; str(e) says why in one sentence."""


def _read_hf_config(path):
    """config.json of a GPT-2 directory, checked against what model.py implements."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise PretrainedError(f"{path}: no config.json, so not a Hugging Face model directory")
    with open(file) as f:
        hf = json.load(f)
    if hf.get("model_type") != "gpt2":
        raise PretrainedError(f"{file}: model_type is {hf.get('model_type')!r}; only GPT-2 checkpoints can be loaded")
    # what GPT-2's code can switch but model.py does not implement; each default is GPT-2's own
    for key, default, ok in [("activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh")),
                             ("n_inner", None, (None, 4 * hf.get("n_embd", 768))),
                             ("layer_norm_epsilon", 1e-5, (1e-5,)),
                             ("scale_attn_weights", True, (True,)),
                             ("scale_attn_by_inverse_layer_idx", False, (False,)),
                             ("add_cross_attention", False, (False,)),
                             ("tie_word_embeddings", True, (True,))]:
        if hf.get(key, default) not in ok:
            raise PretrainedError(f"{file}: {key} = {hf[key]!r} is not supported (GPT-2 uses {ok[0]!r})")
    hf = {"n_positions": 1024, "vocab_size": GPT2_VOCAB, "n_layer": 12, "n_head": 12, "n_embd": 768, **hf}
    return hf


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
