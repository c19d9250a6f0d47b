"""token_logprobs: the log-probability of each target token under softmax(logits / temperature),
and optionally the entropy of that softmax. PPO needs both on every minibatch, with gradient."""

import torch

from kernels._common import use_triton


def token_logprobs_ref(logits, targets, *, temperature=1.0, return_entropy=False):
    """Reference. logits (..., V) of any float dtype, targets (...) int64 -> fp32 (...).

    Reads N*V elements but writes several fp32 (N, V) tensors (the upcast, the division, the
    log-softmax, its exp): for N = 16384, V = 128256 each one is 8 GiB.
    """
    logprobs_all = torch.log_softmax(logits.float() / temperature, dim=-1)  # (..., V)
    logprobs = logprobs_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (...)
    if not return_entropy:
        return logprobs
    entropy = -(logprobs_all.exp() * logprobs_all).sum(-1)  # (...)
    return logprobs, entropy


def token_logprobs(logits, targets, *, temperature=1.0, return_entropy=False):
    """log softmax(logits / temperature) at `targets`, fp32 with the logits' leading shape; with
    return_entropy=True, the tuple (logprobs, entropy). Differentiable in the logits through both."""
    if not use_triton(logits):
        return token_logprobs_ref(logits, targets, temperature=temperature,
                                  return_entropy=return_entropy)
    raise NotImplementedError("the Triton token_logprobs kernel is not written yet")
