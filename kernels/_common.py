"""What the kernel files share: the choice between Triton and the PyTorch reference, and
reading the (..., V) logits as rows without copying them."""

import os

import torch
import triton
import triton.language as tl  # noqa: F401  (a jit function needs tl in its module)


def use_triton(x: torch.Tensor) -> bool:
    """True when an op on `x` should run its Triton kernel rather than its PyTorch reference.

    MINRLHF_KERNELS=triton or =torch forces either; unset, CUDA tensors get Triton and CPU tensors
    the reference. Read on every call so that a test can switch it with monkeypatch.
    """
    choice = os.environ.get("MINRLHF_KERNELS", "")
    if choice not in ("", "triton", "torch"):
        raise ValueError(f"MINRLHF_KERNELS must be 'triton', 'torch' or unset, not {choice!r}")
    if choice == "torch" or (choice == "" and not x.is_cuda):
        return False
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1, "
                           "set before `kernels` is imported")
    return True


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """(..., V) -> a (B, T, V) view of the same memory, so that a kernel reads every row through
    two strides: sliced logits such as logits[:, :-1] then need no copy. Copies only when the last
    dim is strided, or when three or more leading dims cannot be merged into a view."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x.flatten(0, -3)


@triton.jit
def row_pointer(base_ptr, row, T, stride_b, stride_t):
    """In a kernel: where row `row` (int64) of a rows_view (B, T, V) tensor starts."""
    return base_ptr + (row // T) * stride_b + (row % T) * stride_t
