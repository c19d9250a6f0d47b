"""What the kernel files share: the choice between Triton and the PyTorch reference."""

import os

import torch


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
