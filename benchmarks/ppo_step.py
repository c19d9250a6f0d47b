"""One PPO update, phase by phase, through this project's path and through the Hugging Face path
(what TRL's PPO runs), in the same process.

    python benchmarks/ppo_step.py                 # GPU: GPT-2 124M shape; CPU: a tiny shape, so a test runs it
    python benchmarks/ppo_step.py --updates 8     # more updates
    python benchmarks/ppo_step.py | tee benchmarks/ppo_step-$(date +%F)-GPU.txt

Workload (GPU): GPT-2 124M shape with random weights (nothing to download), vocabulary 50257 as
a GPT-2 checkpoint has; 64 prompts, minibatch 16, 4 PPO epochs, bf16. Each update draws, as PPO
on HH-RLHF brings them, a prompt width from 400 to 896 tokens (a real run's were 421-737; 896 +
128 new tokens fill GPT-2's 1024), prompts skewed short under it (most far shorter than the
widest), and a response length from 64 to 128 new tokens, which every row decodes (EOS never
sampled). Both paths slow down on shapes they have not seen (attention backends plan per shape,
CUDA graphs are captured per length, kernels compile), so a one-update benchmark misleads; the
benchmark of 2026-12-04 drew prompt lengths from 50 to 600, whose widest was 591-599 in every
update, and never saw a new width. On a GPU the HF path runs twice: scaled_dot_product_attention
with cuDNN attention first ("HF") and without it ("HF nocudnn"). Reported: every update, then the
first and the median of the rest, for every path, and HF / ours per phase.

- ours: ppo.py's own pieces: the Sampler (bf16 rollout copy, static KV cache, decode step as a
  CUDA graph), response_logprobs / response_values (the lm_head on response positions only, log-probs
  through the fused kernels), frozen reference and reward model in bf16, ppo_advantages, the clipped
  losses, fused AdamW.
- HF: GPT2LMHeadModel and its generate, log_softmax + gather on the response logits, value and
  reward models as GPT2Model + a score head, under bf16 autocast, AdamW (fused).
"""

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import autocast, compute_dtype, import_transformers, make_optimizer  # noqa: E402
from kernels import ppo_advantages  # noqa: E402
from model import GPT, GPTConfig, Sampler  # noqa: E402
from losses import masked_whiten, policy_loss, value_loss  # noqa: E402
from rollout import Rollout, response_logprobs, response_values  # noqa: E402
from scoring import last_token_scores  # noqa: E402

# new: the range of response lengths, prompt_width: of prompt widths (one of each per update)
GPU = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, batch=64, mini=16, new=(64, 128),
           prompt_min=16, prompt_width=(400, 896))
CPU = dict(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=500, batch=8, mini=4, new=(4, 8),
           prompt_min=5, prompt_width=(20, 40))
EPOCHS, LR = 4, 1e-6


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def prompt_batch(s, g, device):
    """One update's left-padded (B, P) random prompts and response length: the width P drawn from
    prompt_width, one prompt that long and the others from prompt_min up, skewed short (the
    median an eighth of the way to P); the response length drawn from new."""
    P = int(torch.randint(s["prompt_width"][0], s["prompt_width"][1] + 1, (1,), generator=g))
    lengths = s["prompt_min"] + ((P - s["prompt_min"]) * torch.rand(s["batch"], generator=g) ** 3).long()
    lengths[0] = P
    ids = torch.randint(0, s["vocab_size"] - 1, (s["batch"], P), generator=g)
    mask = (torch.arange(P)[None] >= (P - lengths)[:, None]).long()
    new = int(torch.randint(s["new"][0], s["new"][1] + 1, (1,), generator=g))
    return ids.to(device), mask.to(device), new


def attention(cudnn):
    """The HF path's scaled_dot_product_attention backends: cuDNN attention first (True) or not
    at all (False); None leaves torch's own choice."""
    if cudnn is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    others = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, *others] if cudnn else others, set_priority=True)


def advantages(old, ref, values, scores):
    """The step both paths share after scoring: KL-shaped rewards and GAE, whitened."""
    mask = torch.ones_like(old)
    adv, returns, _ = ppo_advantages(scores, old, ref, values, mask, kl_coef=0.05, gamma=1.0, lam=0.95)
    return old, values, masked_whiten(adv, mask), returns, mask


def as_rollout(seq, seq_mask, P):
    """The benchmark's sequences as rollout.Rollout: every response runs to its end (no EOS)."""
    return Rollout(seq, seq_mask, P, [""] * len(seq), torch.ones(len(seq), dtype=torch.bool, device=seq.device))


class Ours:
    """ppo.py's update, phase by phase."""

    def __init__(self, s, device):
        config = GPTConfig(**{k: s[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")})
        frozen = compute_dtype(device)
        self.policy = GPT(config).to(device)
        self.ref = GPT(config).to(device, frozen).eval().requires_grad_(False)
        self.reward = GPT(GPTConfig(**{**vars(config), "head": "scalar"})).to(device, frozen).eval().requires_grad_(False)
        self.value = GPT(GPTConfig(**{**vars(config), "head": "scalar"})).to(device)
        self.optimizer = make_optimizer(torch.nn.ModuleList([self.policy, self.value]), LR, 0.0, device, betas=(0.9, 0.999))
        self.sampler = Sampler(self.policy, dtype=frozen)
        self.s = s

    def generate(self, ids, mask, new, g):
        self.policy.eval()
        self.sampler.load(self.policy)
        response = self.sampler.generate(ids, mask, new, temperature=1.0, eos_id=None, generator=g)
        return torch.cat([ids, response], 1), torch.cat([mask, torch.ones_like(response)], 1)

    @torch.no_grad()
    def score(self, seq, seq_mask, P):
        mini, out, rollout = self.s["mini"], [], as_rollout(seq, seq_mask, P)
        for i in range(0, len(seq), mini):
            c = rollout[i:i + mini]
            out.append((response_logprobs(self.policy, c, 1.0), response_logprobs(self.ref, c, 1.0),
                        response_values(self.value, c), last_token_scores(self.reward, c.seq, c.seq_mask)))
        return advantages(*(torch.cat(x) for x in zip(*out)))

    def train(self, seq, seq_mask, P, old, old_values, advantages, returns, mask):
        self.policy.train()
        self.value.train()
        mini = self.s["mini"]
        rollout = as_rollout(seq, seq_mask, P)
        for _ in range(EPOCHS):
            for i in range(0, len(seq), mini):
                c = slice(i, i + mini)
                logprobs, _ = response_logprobs(self.policy, rollout[c], 1.0, return_entropy=True)
                pg, _ = policy_loss(logprobs, old[c], advantages[c], mask[c], 0.2)
                vf, _ = value_loss(response_values(self.value, rollout[c]), old_values[c], returns[c], mask[c], 0.2)
                self.optimizer.zero_grad(set_to_none=True)
                (pg + 0.1 * vf).backward()
                self.optimizer.step()


class HuggingFace:
    """The same update the way TRL's PPO does it: GPT2LMHeadModel.generate, log_softmax + gather."""

    def __init__(self, s, device):
        transformers = import_transformers()
        config = transformers.GPT2Config(vocab_size=s["vocab_size"], n_positions=s["block_size"], n_layer=s["n_layer"],
                                         n_head=s["n_head"], n_embd=s["n_embd"], resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0)

        class Scalar(torch.nn.Module):  # value / reward model: trunk + a score head on every position
            def __init__(self):
                super().__init__()
                self.backbone, self.score = transformers.GPT2Model(config), torch.nn.Linear(config.n_embd, 1)

            def forward(self, ids, mask, pos):
                hidden = self.backbone(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
                return self.score(hidden).squeeze(-1)

        self.policy = transformers.GPT2LMHeadModel(config).to(device)
        self.ref = transformers.GPT2LMHeadModel(config).to(device).eval()
        self.value, self.reward = Scalar().to(device), Scalar().to(device).eval()
        self.optimizer = torch.optim.AdamW(list(self.policy.parameters()) + list(self.value.parameters()), lr=LR,
                                           fused=device.type == "cuda")
        self.s, self.device = s, device

    def generate(self, ids, mask, new, g):
        self.policy.eval()
        with torch.no_grad(), autocast(self.device):
            out = self.policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                       min_new_tokens=new, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                       pad_token_id=self.s["vocab_size"] - 1)
        return out, torch.cat([mask, torch.ones_like(out[:, ids.size(1):])], 1)

    def logprobs(self, model, seq, mask, P):
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=seq, attention_mask=mask, position_ids=pos).logits[:, P - 1:-1]
        return torch.log_softmax(logits.float(), -1).gather(-1, seq[:, P:, None]).squeeze(-1)

    @torch.no_grad()
    def score(self, seq, seq_mask, P):
        mini, out = self.s["mini"], []
        pos = (seq_mask.cumsum(1) - 1).clamp(min=0)
        with autocast(self.device):
            for i in range(0, len(seq), mini):
                c = slice(i, i + mini)
                out.append((self.logprobs(self.policy, seq[c], seq_mask[c], P), self.logprobs(self.ref, seq[c], seq_mask[c], P),
                            self.value(seq[c], seq_mask[c], pos[c])[:, P - 1:-1].float(),
                            self.reward(seq[c], seq_mask[c], pos[c])[:, -1].float()))
        return advantages(*(torch.cat(x) for x in zip(*out)))

    def train(self, seq, seq_mask, P, old, old_values, advantages, returns, mask):
        self.policy.train()
        self.value.train()
        mini = self.s["mini"]
        pos = (seq_mask.cumsum(1) - 1).clamp(min=0)
        for _ in range(EPOCHS):
            for i in range(0, len(seq), mini):
                c = slice(i, i + mini)
                with autocast(self.device):
                    logprobs = self.logprobs(self.policy, seq[c], seq_mask[c], P)
                    values = self.value(seq[c], seq_mask[c], pos[c])[:, P - 1:-1].float()
                ratio = torch.exp(logprobs - old[c])
                loss = torch.max(-advantages[c] * ratio, -advantages[c] * ratio.clamp(0.8, 1.2)).mean()
                loss = loss + 0.1 * F.mse_loss(values, old_values[c])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()


def update(path, ids, mask, new, g, device):
    """One update through `path`; seconds per phase."""
    seconds = {}
    sync(device)
    t = time.perf_counter()
    seq, seq_mask = path.generate(ids, mask, new, g)
    sync(device)
    seconds["generation"] = time.perf_counter() - t
    t = time.perf_counter()
    P = ids.size(1)
    rollout = path.score(seq, seq_mask, P)
    sync(device)
    seconds["scoring"] = time.perf_counter() - t
    t = time.perf_counter()
    path.train(seq, seq_mask, P, *rollout)
    sync(device)
    seconds["training"] = time.perf_counter() - t
    seconds["update"] = sum(seconds.values())
    seconds["per token"] = seconds["generation"] / new
    return seconds


def main():
    parser = argparse.ArgumentParser(description="Time one PPO update: this project's path against Hugging Face's.")
    parser.add_argument("--updates", type=int, default=5, help="updates per path, each with new prompts (default 5)")
    parser.add_argument("--device", default="", help="cuda or cpu (default: cuda if available)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    s = GPU if device.type == "cuda" else CPU
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [prompt_batch(s, g, device) for _ in range(args.updates)]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (a tiny shape: the GPU numbers are the ones that matter)"
    print(f"{time.strftime('%Y-%m-%d')}  {name}  torch {torch.__version__}")
    print(f"PPO update: {s['n_layer']} layers x {s['n_embd']}, V={s['vocab_size']}, {s['batch']} prompts, "
          f"widths {s['prompt_width'][0]}-{s['prompt_width'][1]} (P), {s['new'][0]}-{s['new'][1]} new tokens (R, no EOS), "
          f"both drawn per update, minibatch {s['mini']}, {EPOCHS} epochs")
    phases = ["generation", "scoring", "training", "update"]
    paths = [("ours", Ours, None)]  # label, class, cuDNN attention for HF
    paths += [("HF", HuggingFace, True), ("HF nocudnn", HuggingFace, False)] if device.type == "cuda" else \
        [("HF", HuggingFace, None)]
    results = {}
    for label, cls, cudnn in paths:
        path = cls(s, device)
        sample_gen = torch.Generator(device=device).manual_seed(0)
        results[label] = []
        for i, (ids, mask, new) in enumerate(batches):
            with attention(cudnn):
                seconds = update(path, ids, mask, new, sample_gen, device)
            results[label].append(seconds)
            print(f"{label:<10} update {i}  P={ids.size(1):4d}  R={new:4d}  "
                  + "  ".join(f"{k} {1000 * seconds[k]:9.1f} ms" for k in phases)
                  + f"  ({1000 * seconds['per token']:.2f} ms per decoded token)", flush=True)
        del path
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def row(label, pick):
        return [1000 * pick([r[p] for r in results[label]]) for p in phases + ["per token"]]

    print(f"\n{'ms':<32}" + "".join(f"{p:>12}" for p in phases) + f"{'ms/token':>12}")
    table = {}
    for label in results:
        table[label, "first"] = row(label, lambda xs: xs[0])
        table[label, "median"] = row(label, lambda xs: statistics.median(xs[1:] or xs))
        for which in ("first", "median"):
            print(f"{label + ', ' + which + (' update' if which == 'first' else ' of the rest'):<32}"
                  + "".join(f"{v:12.1f}" for v in table[label, which][:-1]) + f"{table[label, which][-1]:12.2f}")
    for label in results:
        if label == "ours":
            continue
        for which in ("first", "median"):
            ratio = [h / o for h, o in zip(table[label, which], table["ours", which])][:-1]
            print(f"{label + ' / ours, ' + which:<32}" + "".join(f"{r:11.2f}x" for r in ratio))


if __name__ == "__main__":
    main()
