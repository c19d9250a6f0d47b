"""What the kernel files share: Triton itself (or a stand-in where it is not installed), the
choice between Triton and the PyTorch reference, block sizes (fixed per kind of shape on a GPU,
autotuned on request), and reading (..., V) logits as rows in place with wide, aligned loads."""

import os

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # macOS, for one, has no triton wheel: there the references run
    HAVE_TRITON = False

# Triton reads TRITON_INTERPRET when a kernel is decorated, that is when kernels/ is imported;
# so is MINRLHF_AUTOTUNE (see launch_config).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("MINRLHF_AUTOTUNE") == "1"

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
    def jit(fn=None, **options):  # @triton.jit and @triton.jit(do_not_specialize=...)
        return fn if fn is not None else (lambda fn: fn)

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


def launch_config(configs, key, gpu, interpret, **autotune_options):
    """Decorator for a kernel's block sizes, warps and stages.

    On a GPU, by default, `gpu(args)` gives them: a dict of the block-size names of `configs` plus
    num_warps and num_stages, a function of the launch arguments that stay fixed through a run
    (the vocabulary, the hidden size, the dtype), never of a batch's N or T. Nothing is timed, and
    with the shape arguments marked do_not_specialize in each kernel, a batch of a new shape runs
    the kernel already compiled. With autotuning per shape, the first PPO update on an H200 took
    24.8 s, its training phase 17.6 s, mostly tuning and compiling (gpu-runs of 2026-12-04), and
    a new response length tuned again mid-run.

    MINRLHF_AUTOTUNE=1 (read at import) runs triton.autotune over `configs` instead, keyed on
    `key` (arguments fixed through a run, plus the dtypes), with its timings cached on disk in
    Triton's cache (cache_results=True): the first run on a machine times them, later ones read
    them. `python -m kernels.bench` prints what it picked.

    Under the interpreter `interpret(args)` gives the block sizes: small ones, so that the tests'
    small shapes span several blocks. Both functions are attributes of the kernel (gpu_config,
    interpret_config), called at every launch: a test may replace them."""
    if not HAVE_TRITON:
        return lambda fn: fn
    if AUTOTUNE and not INTERPRET:
        return triton.autotune(configs=configs, key=key, cache_results=True, **autotune_options)
    names = list(configs[0].kwargs) + ([] if INTERPRET else ["num_warps", "num_stages"])

    def decorate(fn):
        def pick(args, name):
            config = kernel.interpret_config if INTERPRET else kernel.gpu_config
            return config(args)[name]
        kernel = triton.heuristics({name: (lambda args, name=name: pick(args, name))
                                    for name in names})(fn)
        kernel.gpu_config, kernel.interpret_config = gpu, interpret
        return kernel
    return decorate


def row_config(V, block):
    """The launch config of a row kernel (one program per row of V, in blocks): blocks of `block`
    columns, fewer for a shorter row (down to 16), 8 warps for the widest ones (16 columns, two
    16-byte loads of bf16, per thread), fewer for narrower ones."""
    block = min(block, max(16, triton.next_power_of_2(V)))
    return {"BLOCK_V": block, "num_warps": max(1, min(8, block // 512)), "num_stages": 1}


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


@triton.jit
def write_row_grad(block_grad: tl.constexpr, row_values, logits_ptr, grad_ptr, start, V,
                   ALIGN: tl.constexpr, BLOCK: tl.constexpr, OPTION: tl.constexpr):
    """In a backward kernel: the walk over one row of V logits, starting at element `start` of
    logits_ptr, that writes its gradient at the same elements of grad_ptr (which has the logits'
    layout: rows_and_grad), in grad_ptr's dtype. Whole blocks are loaded and stored unmasked and
    aligned (row_blocks), then the head and the tail masked. The op's gradient of one block is
    block_grad(z, cols, col0, in_row, row_values, WHOLE, ALIGN, BLOCK, OPTION):
      z        the block's logits in fp32, -inf past the row (p = 0 there, so that the lanes not
               stored stay finite); cols their columns;
      WHOLE    (constexpr) a whole block: col0 its first column, a multiple of ALIGN from the
               row's start; else in_row the lanes inside the row;
      row_values  the op's own per-row values, a tuple (whose elements are runtime values);
      OPTION   a constexpr of the op's own, passed through (kl_full: whether the reference's
               rows are aligned as the policy's)."""
    out_ty = grad_ptr.dtype.element_ty
    head, n_full = row_blocks(start, V, ALIGN, BLOCK)
    for i in range(n_full):
        col0 = head + i * BLOCK
        block = tl.multiple_of(start + col0, ALIGN) + tl.arange(0, BLOCK)
        z = tl.load(logits_ptr + block).to(tl.float32)
        grad = block_grad(z, col0 + tl.arange(0, BLOCK), col0, None, row_values, True, ALIGN,
                          BLOCK, OPTION)
        tl.store(grad_ptr + block, grad.to(out_ty))
    for r in range(0, V - n_full * BLOCK, BLOCK):
        cols, in_row = rest_columns(r, head, n_full, V, BLOCK)
        z = tl.load(logits_ptr + start + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        grad = block_grad(z, cols, None, in_row, row_values, False, ALIGN, BLOCK, OPTION)
        tl.store(grad_ptr + start + cols, grad.to(out_ty), mask=in_row)
