"""Fused kernels for the PPO inner loop. Each public function runs its Triton kernel on CUDA
tensors and its PyTorch reference (`*_ref`, same file) on CPU ones; MINRLHF_KERNELS=triton or
=torch forces either (Triton on CPU needs TRITON_INTERPRET=1). Where Triton is not installed
(macOS has no wheel) everything runs the references, and MINRLHF_KERNELS=triton says so.
On a GPU each kernel runs one launch config per kind of shape (MINRLHF_AUTOTUNE=1: autotuned,
cached on disk; _common.launch_config), and linear_logprobs holds the logits where they fit in
MINRLHF_LOGITS_BUDGET_MIB (linear_logprobs.py). `python -m kernels.bench` times each kernel
against its reference."""

from kernels.gae import gae, gae_ref, ppo_advantages, ppo_advantages_ref
from kernels.kl import kl_full, kl_full_ref
from kernels.linear_logprobs import linear_logprobs, linear_logprobs_ref
from kernels.logprobs import token_logprobs, token_logprobs_ref

__all__ = [
    "token_logprobs", "token_logprobs_ref", "kl_full", "kl_full_ref",
    "gae", "gae_ref", "ppo_advantages", "ppo_advantages_ref", "linear_logprobs",
    "linear_logprobs_ref",
]
