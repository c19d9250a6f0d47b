"""
What a policy writes and what it thinks of it: generation and log-probs, for every stage.

    encode_prompts, decode        text <-> token ids (prompts cut from the left to fit)
    generate -> Rollout           left-padded prompts, sampled responses cut after their EOS, texts
    sample_responses              K texts per prompt (sample.py, label.py, the task's rankings)
    token_logprobs_of             THE shift-and-gather: log-probs of a sequence's tokens under a model
    sequence_logprobs             summed log-prob of each response given its prompt (SFT, DPO, perplexity)
    response_logprobs, values     per-token log-probs / values of a rollout's responses (PPO)
    exact_kl                      KL(policy || reference) per response over the whole vocabulary
"""

from dataclasses import dataclass

import torch
from tqdm import tqdm

from common import autocast, compute_dtype
from data.tokenizer import encode_prompt, get_tokenizer, pad
from kernels import kl_full
from model import Sampler


# ----------------------------------------------------------------------------- text <-> ids

def encode_prompts(enc, prompts, max_len, stats=None):
    """Prompt token ids, cut from the left to max_len tokens (the end of a prompt matters most);
    how many were cut goes to stats["truncated"]."""
    ids = [encode_prompt(enc, p) for p in prompts]
    if stats is not None:
        stats["truncated"] = stats.get("truncated", 0) + sum(len(x) > max_len for x in ids)
    return [x[-max_len:] for x in ids]


def decode(enc, response):
    """One response's token ids -> text, up to (not including) its first EOS."""
    response = list(response)
    if enc.eot_token in response:
        response = response[:response.index(enc.eot_token)]
    return enc.decode(response)


def response_mask(response, eos_id):
    """(B, N) 1 up to and including each row's first EOS (all ones if it never ends)."""
    is_eos = (response == eos_id).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0  # strictly after the first EOS
    return (~after_eos).long()


# ----------------------------------------------------------------------------- generation

@dataclass
class Rollout:
    """A batch of prompts and the responses sampled for them."""
    seq: torch.Tensor  # (B, P + N) the left-padded prompt, then the response (EOS-filled after its EOS)
    seq_mask: torch.Tensor  # (B, P + N) 1 on real prompt tokens and on the response up to and including its first EOS
    P: int  # prompt width: the response is seq[:, P:]
    texts: list  # the responses as text, up to their EOS
    ended: torch.Tensor  # (B,) bool: the response ended with EOS (else it ran out of tokens)

    @property
    def response(self):
        return self.seq[:, self.P:]  # (B, N)

    @property
    def mask(self):
        return self.seq_mask[:, self.P:].float()  # (B, N) the response tokens that count

    def __getitem__(self, rows):
        """The rollout of some rows (a slice or an index tensor)."""
        texts = self.texts[rows] if isinstance(rows, slice) else [self.texts[i] for i in rows.tolist()]
        return Rollout(self.seq[rows], self.seq_mask[rows], self.P, texts, self.ended[rows])


@torch.no_grad()
def generate(sampler, prompt_ids, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Left-pad a batch of prompts, sample a response to each with sampler (a model.Sampler,
    which holds the static KV cache and the CUDA graphs) and cut it after its first EOS."""
    model = sampler.model
    device = next(model.parameters()).device
    enc = get_tokenizer(model.config.tokenizer)
    ids, mask = (t.to(device) for t in pad(prompt_ids, enc.eot_token, left=True))
    response = sampler.generate(ids, mask, max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                                eos_id=enc.eot_token, n_vocab=enc.n_vocab, generator=generator)
    seq_mask = torch.cat([mask, response_mask(response, enc.eot_token)], 1)
    return Rollout(torch.cat([ids, response], 1), seq_mask, ids.size(1), [decode(enc, r) for r in response.tolist()],
                   (response == enc.eot_token).any(1))


def sample_responses(model, prompts, k=1, *, batch_size=256, seed=0, max_new_tokens=40, progress=False, **sampling):
    """K sampled responses for each prompt: [[str] * k] * len(prompts)."""
    model.eval()
    enc = get_tokenizer(model.config.tokenizer)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt_ids = encode_prompts(enc, prompts, model.config.block_size - max_new_tokens)
    flat = [i for i in range(len(prompts)) for _ in range(k)]  # each prompt k times, side by side
    sampler = Sampler(model, dtype=compute_dtype(device))
    texts = []
    for s in tqdm(range(0, len(flat), batch_size), desc="sampling", disable=None if progress else True):
        chunk = flat[s:s + batch_size]
        texts += generate(sampler, [prompt_ids[i] for i in chunk], max_new_tokens=max_new_tokens, generator=generator,
                          **sampling).texts
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]


def task_rankings(policy, task, n, seed=0):
    """--data task[:NAME] in reward.py and dpo.py: 4 samples from the policy for each of the
    task's first n train prompts, ranked by its simulated raters (train.sh's steps 2-3 in one)."""
    prompts = task.prompts("train")[:n]
    samples = sample_responses(policy, prompts, k=4, seed=seed)
    return task.rate([{"prompt": p, "responses": r} for p, r in zip(prompts, samples)], seed=seed)


# ----------------------------------------------------------------------------- log-probs and values

def token_logprobs_of(model, ids, mask=None, *, start=1, temperature=1.0, return_entropy=False):
    """Log-probs (B, T - start) of the tokens ids[:, start:] under the model at `temperature`
    (and their entropies): position t predicts token t + 1, so positions start - 1 .. T - 2 go
    through the lm_head and no other (the model's fused path: no (B, T, V) logits held).
    mask: (B, T) for left-padded ids; None for right-padded or unpadded ones (causal attention
    alone keeps real tokens off the pads after them)."""
    with autocast(ids.device):
        return model(ids[:, :-1], None if mask is None else mask[:, :-1], start=start - 1, targets=ids[:, start:],
                     temperature=temperature, return_entropy=return_entropy)


def demo_batch(examples, eot, device):
    """[(prompt_ids, response_ids)] -> right-padded ids and the loss mask (B, T) each; the loss
    mask covers the response tokens and their EOS."""
    ids, _ = pad([p + r for p, r in examples], eot)
    loss_mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(examples):
        loss_mask[i, len(p):len(p) + len(r)] = 1
    return ids.to(device), loss_mask.to(device)


def sequence_logprobs(model, examples, eot, device):
    """Summed log-prob of each response (and its EOS) given its prompt, for [(prompt_ids,
    response_ids)]. Returns (logprobs (N,), response lengths (N,)), fp32."""
    ids, loss_mask = demo_batch(examples, eot, device)
    loss_mask = loss_mask[:, 1:]
    return (token_logprobs_of(model, ids) * loss_mask).sum(1), loss_mask.sum(1)


def response_logprobs(model, rollout, temperature, return_entropy=False):
    """Log-probs (B, N) of the rollout's response tokens under the model at `temperature`."""
    return token_logprobs_of(model, rollout.seq, rollout.seq_mask, start=rollout.P, temperature=temperature,
                             return_entropy=return_entropy)


def response_values(value_model, rollout):
    """Value (B, N) of the state before each response token."""
    seq, mask = rollout.seq, rollout.seq_mask
    with autocast(seq.device):
        return value_model(seq[:, :-1], mask[:, :-1], start=rollout.P - 1).float()


@torch.no_grad()
def exact_kl(policy, ref, rollout, temperature, chunk):
    """KL(policy || reference) per response (B,): the exact per-token KL over the whole vocabulary
    (kernels.kl_full), summed over the response, chunk rows at a time (the logits are (chunk, N, V))."""
    kl = []
    for s in range(0, rollout.seq.size(0), chunk):
        r = rollout[s:s + chunk]
        with autocast(r.seq.device):
            logits = policy(r.seq[:, :-1], r.seq_mask[:, :-1], start=r.P - 1)  # (b, N, V)
            ref_logits = ref(r.seq[:, :-1], r.seq_mask[:, :-1], start=r.P - 1)
        kl.append((kl_full(logits, ref_logits, temperature=temperature) * r.mask).sum(1))
    return torch.cat(kl)
