"""What the kernel files share: Triton itself (or a stand-in where it is not installed), the
choice between Triton and the PyTorch reference, block sizes (autotuned on a GPU), and reading
(..., V) logits as rows in place with wide, aligned loads."""

import os

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # macOS, for one, has no triton wheel: there the references run
    HAVE_TRITON = False

# Triton reads TRITON_INTERPRET when a kernel is decorated, that is when kernels/ is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

NO_TRITON = ("MINRLHF_KERNELS=triton, but Triton is not installed: it has wheels for Linux only "
             "(`pip install triton` there); unset MINRLHF_KERNELS to run the PyTorch references.")


class _NoTriton:
    """Stands in for both `triton` and `triton.language` when Triton is not installed, so that each
    kernel file still reads as plain Triton (`@triton.jit`, `BLOCK: tl.constexpr`, a list of
    `triton.Config`) and still imports: the decorators hand back the undecorated functions. One
    shim here instead of an `if HAVE_TRITON:` around every kernel. Nothing is ever launched without
    Triton: use_triton() answers False, or raises NO_TRITON, before any launcher runs."""

    @staticmethod
    def constexpr(value=None):
        return value

    @staticmethod
    def jit(fn):
        return fn

    @staticmethod
    def Config(kwargs, **options):
        return dict(kwargs, **options)

    @staticmethod
    def autotune(**kwargs):
        return lambda fn: fn

    @staticmethod
    def heuristics(values):
        return lambda fn: fn


if not HAVE_TRITON:
    triton = tl = _NoTriton()


def use_triton(x: torch.Tensor) -> bool:
    """True when an op on `x` should run its Triton kernel rather than its PyTorch reference.

    MINRLHF_KERNELS=triton or =torch forces either; unset, CUDA tensors get Triton (where it is
    installed) and CPU tensors the reference. Read on every call so that a test can switch it with
    monkeypatch.
    """
    choice = os.environ.get("MINRLHF_KERNELS", "")
    if choice not in ("", "triton", "torch"):
        raise ValueError(f"MINRLHF_KERNELS must be 'triton', 'torch' or unset, not {choice!r}")
    if choice == "torch" or (choice == "" and not (x.is_cuda and HAVE_TRITON)):
        return False
    if not HAVE_TRITON:
        raise RuntimeError(NO_TRITON)
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1, "
                           "set before `kernels` is imported")
    return True


def autotune(configs, key, interpret, **options):
    """Decorator for a kernel's block sizes. On a GPU: triton.autotune over `configs`, timed on the
    first launch for each new value of the `key` arguments (a PPO run has one vocabulary and one
    response length, so it tunes once). Under the interpreter, which would time every config on
    the CPU, `interpret` picks them instead: {name: function of the launch arguments}, as
    triton.heuristics takes; it reads module globals at launch, so a test can shrink the blocks."""
    if INTERPRET:
        return triton.heuristics(interpret)
    return triton.autotune(configs=configs, key=key, **options)


# ---- rows ------------------------------------------------------------------------------------

WIDE = 16  # bytes in the widest load a thread issues (128 bits)


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """(..., V) -> a (B, T, V) view of the same memory, so that a kernel reads every row through
    two strides: sliced logits such as logits[:, :-1] or full[..., :V] then need no copy. Copies
    only when the last dim is strided, when rows overlap (an expanded tensor), or when three or more
    leading dims cannot be merged into a view."""
    overlapping = any(n > 1 and stride == 0 for n, stride in zip(x.shape[:-1], x.stride()[:-1]))
    if x.stride(-1) != 1 or overlapping:
        x = x.contiguous()
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x.flatten(0, -3)


def row_args(rows: torch.Tensor):
    """(base, offset, stride_b, stride_t, ALIGN) for a kernel reading `rows` (B, T, V): row (b, t)
    starts at element offset + b * stride_b + t * stride_t of base, and base's address is a
    multiple of 16 bytes: Triton checks that of every pointer argument, so the kernel may claim
    (tl.multiple_of) that a block starting at a multiple of ALIGN elements is 16-byte aligned and
    load it in 128-bit pieces. base is `rows` moved back by at most 15 bytes, still inside its
    storage; where that is impossible (a storage that itself starts unaligned), ALIGN is 1 and the
    kernel claims nothing."""
    size = rows.element_size()
    offset = (rows.data_ptr() % WIDE) // size
    if rows.data_ptr() % size or rows.storage_offset() < offset:
        return rows, 0, rows.stride(0), rows.stride(1), 1
    base = rows.as_strided((1,), (1,), rows.storage_offset() - offset)
    return base, offset, rows.stride(0), rows.stride(1), WIDE // size


def rows_and_grad(x: torch.Tensor):
    """rows_view(x) (B, T, V), and an empty gradient of the same shape, dtype, strides and address
    modulo 16 bytes, so that a backward reading the rows and writing the gradient cuts both into
    the same aligned blocks (row_args gives both the same offset and strides). Rows in a wider
    buffer (full[..., :V] of a padded vocabulary, logits[:, :-1]) get a gradient in a wider buffer
    too, never read; where that would waste more than a quarter and more than 64K elements (a
    narrow slice of a wide buffer), the rows are copied first and both are dense."""
    rows = rows_view(x)
    extent = 1 + sum((n - 1) * stride for n, stride in zip(rows.shape, rows.stride()))
    if extent > rows.numel() * 5 // 4 + 2**16:
        rows = rows.contiguous()
        extent = rows.numel()
    offset = (rows.data_ptr() % WIDE) // rows.element_size()
    storage = torch.empty(offset + extent * (rows.numel() > 0), dtype=rows.dtype,
                          device=rows.device)
    assert storage.data_ptr() % WIDE == 0, "PyTorch's allocators align to 64 bytes or more"
    return rows, storage.as_strided(rows.shape, rows.stride(), offset)


@triton.jit
def row_start(row, offset, T, stride_b, stride_t):
    """In a kernel: the element of a row_args base where row `row` (int64) of (B, T, V) starts."""
    return offset + (row // T) * stride_b + (row % T) * stride_t


@triton.jit
def row_blocks(start, V, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """In a kernel: how a row of V elements that starts at element `start` is cut into blocks.
    Its first `head` (< ALIGN) columns run up to the first 16-byte boundary; from there come
    `n_full` whole blocks of BLOCK columns, loaded unmasked and aligned, so in 128-bit pieces; the
    head and the tail (together fewer than BLOCK + ALIGN columns) are loaded masked, by
    rest_columns. A mask such as `cols < V` on every load, with V = 50257 (not a multiple of the
    vector width), would make every load a scalar one."""
    head = (ALIGN - start % ALIGN) % ALIGN
    # maximum: // of a negative number rounds down in the interpreter (numpy), to 0 on the GPU
    n_full = tl.maximum(V - head, 0) // BLOCK
    return head, n_full


@triton.jit
def rest_columns(r, head, n_full, V, BLOCK: tl.constexpr):
    """In a kernel: the columns of the head and the tail that lanes r, r + 1, ... of a masked block
    hold (lanes below `head` the head, the rest the tail after the whole blocks), and which of
    those lanes are in the row. The masked blocks are r = 0, BLOCK, ... < V - n_full * BLOCK."""
    lane = r + tl.arange(0, BLOCK)
    cols = tl.where(lane < head, lane, lane + n_full * BLOCK)
    return cols, lane < V - n_full * BLOCK
