"""kl_full: the exact KL(policy || reference) per token, summed over the whole vocabulary."""

import torch

from kernels._common import use_triton


def kl_full_ref(logits, ref_logits, *, temperature=1.0):
    """Reference. logits, ref_logits (..., V) -> fp32 (...): sum_v p_v (log p_v - log q_v), with
    p = softmax(logits / T) the policy and q = softmax(ref_logits / T) the frozen reference.

    Reads 2*N*V elements but writes about six fp32 (N, V) tensors on the way.
    """
    ref_logits = ref_logits.detach()  # the reference model is frozen: no gradient flows to it
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)  # (..., V)
    ref_logprobs = torch.log_softmax(ref_logits.float() / temperature, dim=-1)  # (..., V)
    return (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1)


def kl_full(logits, ref_logits, *, temperature=1.0):
    """KL(softmax(logits / T) || softmax(ref_logits / T)) per token, fp32 with the leading shape;
    differentiable in `logits` only."""
    if not use_triton(logits):
        return kl_full_ref(logits, ref_logits, temperature=temperature)
    raise NotImplementedError("the Triton kl_full kernel is not written yet")
