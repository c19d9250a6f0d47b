"""kl_full: the exact KL(policy || reference) per token, summed over the whole vocabulary.

With z = logits and y = ref_logits in fp32, 1/T the reciprocal of the temperature,
p = softmax(z / T), q = softmax(y / T), m = max z, s = sum exp((z - m) / T), and ref_m, ref_s the
same for y, per row
    log p_v - log q_v = ((z_v - m) - (y_v - ref_m)) / T - (log s - log ref_s)
    KL = sum_v p_v (log p_v - log q_v) = (u / s) / T - (log s - log ref_s),
    u  = sum_v exp((z_v - m) / T) ((z_v - m) - (y_v - ref_m))
The forward reads both rows once in blocks, keeping running maxima and sums for both (the online
softmax, and the aligned blocks, of logprobs.py) and u, rescaled whenever a max grows. Every
difference is taken relative to the maxima, never through lse = m + log s or z - y: at logits of
1e4 the fp32 spacing is 1e-3, which would swamp a small KL between two large, nearly equal rows.
And differences are taken in the logits' own units, scaled by 1/T only after, as logprobs.py
explains: the version that divided first gave KL(p || p), exactly 0 with gradient 0, gradients up
to 5e-4 on an H100 at T = 0.7; here (z - m) - (y - ref_m) is exactly 0 when z == y, whatever the
compiler does.
"""

import torch

from kernels._common import (launch_config, rest_columns, row_args, row_blocks, row_config,
                             row_start, rows_and_grad, rows_view, tl, triton, use_triton,
                             write_row_grad)
from kernels.logprobs import CONFIGS

# Blocks as in logprobs.py: a GPU's, and the interpreter's, at most this wide
BLOCK_V = 4096
INTERPRET_BLOCK_V = 4096
# not specialised on, as in logprobs.py: they change with the batch
ROW_ARGS = ["offset", "stride_b", "stride_t", "ref_offset", "ref_stride_b", "ref_stride_t", "T",
            "V", "kl_ptr", "max_ptr", "log_sum_ptr", "ref_max_ptr", "ref_log_sum_ptr"]


def _gpu_config(args):
    return row_config(args["V"], BLOCK_V)


def _interpret_config(args):
    return row_config(args["V"], INTERPRET_BLOCK_V)


@triton.jit
def _ref_block(ref_ptr, ref_start, col0, ALIGN: tl.constexpr, REF_ALIGNED: tl.constexpr,
               BLOCK_V: tl.constexpr):
    # The reference's logits (fp32) in the whole block that starts at column col0, where the
    # policy's row is 16-byte aligned (row_blocks); the reference's too when REF_ALIGNED, and then
    # they load as wide.
    ref_block = ref_start + col0
    if REF_ALIGNED:
        ref_block = tl.multiple_of(ref_block, ALIGN)
    return tl.load(ref_ptr + ref_block + tl.arange(0, BLOCK_V)).to(tl.float32)


@triton.jit
def _fwd_update(z, y, in_row, m, ref_m, s, ref_s, u, inv_temperature):
    # One block of both rows: z, y (BLOCK_V,) fp32, in_row False in masked lanes (their values
    # are 0 and must not count). The maxima are the rows' so far (scalars); s, ref_s and u are
    # kept per lane and added up across lanes after the row, as in logprobs.py: two reductions
    # across the program per block (the maxima) instead of five. Returns them at the new maxima.
    m_new = tl.maximum(m, tl.max(tl.where(in_row, z, float("-inf")), axis=0))
    ref_m_new = tl.maximum(ref_m, tl.max(tl.where(in_row, y, float("-inf")), axis=0))
    alpha = tl.exp((m - m_new) * inv_temperature)  # rescales the sums so far to the new max
    # exp(-inf) = 0 in masked lanes (exp of their 0 - max could overflow)
    p = tl.exp(tl.where(in_row, z - m_new, float("-inf")) * inv_temperature)
    ref_p = tl.exp(tl.where(in_row, y - ref_m_new, float("-inf")) * inv_temperature)
    # each old term of u gains (ref_m_new - ref_m) - (m_new - m) and the factor alpha; where p is
    # 0 (masked lanes, logits of -inf) its term is 0, not 0 * inf
    u = alpha * (u + ((ref_m_new - ref_m) - (m_new - m)) * s)
    u += p * tl.where(p > 0, (z - m_new) - (y - ref_m_new), 0.0)
    s = alpha * s + p
    ref_s = tl.exp((ref_m - ref_m_new) * inv_temperature) * ref_s + ref_p
    return m_new, ref_m_new, s, ref_s, u


@launch_config(CONFIGS, key=["V"], gpu=_gpu_config, interpret=_interpret_config)
@triton.jit(do_not_specialize=ROW_ARGS)
def _fwd_kernel(logits_ptr, ref_ptr, kl_ptr, max_ptr, log_sum_ptr, ref_max_ptr, ref_log_sum_ptr,
                offset, stride_b, stride_t, ref_offset, ref_stride_b, ref_stride_t, T, V,
                inv_temperature, ALIGN: tl.constexpr, REF_ALIGNED: tl.constexpr,
                BLOCK_V: tl.constexpr):
    # One program per row; reads 2 * V logits, writes 5 floats. The blocks are aligned for the
    # policy logits, and for the reference's when REF_ALIGNED (the same layout modulo 16 bytes).
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31 at N*V > 2e9
    start = row_start(row, offset, T, stride_b, stride_t)
    ref_start = row_start(row, ref_offset, T, ref_stride_b, ref_stride_t)
    # the maxima start at the rows' first values, so that the first rescale multiplies finite ones
    m = tl.load(logits_ptr + start).to(tl.float32)
    ref_m = tl.load(ref_ptr + ref_start).to(tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)  # sum exp((z - m) / T)
    ref_s = tl.zeros((BLOCK_V,), tl.float32)  # sum exp((y - ref_m) / T)
    u = tl.zeros((BLOCK_V,), tl.float32)  # sum exp((z - m) / T) ((z - m) - (y - ref_m))
    head, n_full = row_blocks(start, V, ALIGN, BLOCK_V)
    for i in range(n_full):
        col0 = head + i * BLOCK_V
        z = tl.load(logits_ptr + tl.multiple_of(start + col0, ALIGN) + tl.arange(0, BLOCK_V))
        y = _ref_block(ref_ptr, ref_start, col0, ALIGN, REF_ALIGNED, BLOCK_V)
        m, ref_m, s, ref_s, u = _fwd_update(z.to(tl.float32), y,
                                            tl.full((BLOCK_V,), True, tl.int1), m, ref_m, s,
                                            ref_s, u, inv_temperature)
    for r in range(0, V - n_full * BLOCK_V, BLOCK_V):
        cols, in_row = rest_columns(r, head, n_full, V, BLOCK_V)
        z = tl.load(logits_ptr + start + cols, mask=in_row, other=0.0).to(tl.float32)
        y = tl.load(ref_ptr + ref_start + cols, mask=in_row, other=0.0).to(tl.float32)
        m, ref_m, s, ref_s, u = _fwd_update(z, y, in_row, m, ref_m, s, ref_s, u, inv_temperature)
    s = tl.sum(s, axis=0)
    log_s = tl.log(s)
    ref_log_s = tl.log(tl.sum(ref_s, axis=0))
    tl.store(kl_ptr + row, inv_temperature * tl.sum(u, axis=0) / s - (log_s - ref_log_s))
    tl.store(max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_s)
    tl.store(ref_max_ptr + row, ref_m)
    tl.store(ref_log_sum_ptr + row, ref_log_s)


@triton.jit
def _block_grad(z, cols, col0, in_row, row_values, WHOLE: tl.constexpr, ALIGN: tl.constexpr,
                BLOCK_V: tl.constexpr, REF_ALIGNED: tl.constexpr):
    # The gradient of one block (see _common.write_row_grad):
    #   d KL / d x_v = p_v (log p_v - log q_v - KL),  and d / d z = (d / d x) / T
    ref_ptr, ref_start, m, log_s, ref_m, ref_log_s, kl, grad_kl, inv_temperature = row_values
    if WHOLE:
        y = _ref_block(ref_ptr, ref_start, col0, ALIGN, REF_ALIGNED, BLOCK_V)
    else:
        y = tl.load(ref_ptr + ref_start + cols, mask=in_row, other=0.0).to(tl.float32)
    p = tl.exp((z - m) * inv_temperature - log_s)
    log_ratio = ((z - m) - (y - ref_m)) * inv_temperature - (log_s - ref_log_s)  # log p - log q
    return grad_kl * p * tl.where(p > 0, log_ratio - kl, 0.0) * inv_temperature


@launch_config(CONFIGS, key=["V"], gpu=_gpu_config, interpret=_interpret_config)
@triton.jit(do_not_specialize=ROW_ARGS + ["grad_kl_ptr"])
def _bwd_kernel(logits_ptr, ref_ptr, kl_ptr, max_ptr, log_sum_ptr, ref_max_ptr, ref_log_sum_ptr,
                grad_kl_ptr, grad_logits_ptr, offset, stride_b, stride_t, ref_offset,
                ref_stride_b, ref_stride_t, T, V, inv_temperature, ALIGN: tl.constexpr,
                REF_ALIGNED: tl.constexpr, BLOCK_V: tl.constexpr):
    # One program per row; reads 2 * V logits and 6 floats, writes V gradients (logits' dtype and
    # layout, see rows_and_grad).
    row = tl.program_id(0).to(tl.int64)
    ref_start = row_start(row, ref_offset, T, ref_stride_b, ref_stride_t)
    row_values = (ref_ptr, ref_start, tl.load(max_ptr + row), tl.load(log_sum_ptr + row),
                  tl.load(ref_max_ptr + row), tl.load(ref_log_sum_ptr + row),
                  tl.load(kl_ptr + row), tl.load(grad_kl_ptr + row), inv_temperature)
    write_row_grad(_block_grad, row_values, logits_ptr, grad_logits_ptr,
                   row_start(row, offset, T, stride_b, stride_t), V, ALIGN, BLOCK_V, REF_ALIGNED)


def _launch_args(rows, ref_rows):
    """The row arguments of both (B, T, V) inputs, and whether the reference's rows fall into the
    same aligned blocks as the policy's (same element size, same offsets and strides modulo 16
    bytes): then its blocks load wide too. Two outputs of the same model always do."""
    base, offset, stride_b, stride_t, align = row_args(rows)
    ref_base, ref_offset, ref_stride_b, ref_stride_t, ref_align = row_args(ref_rows)
    ref_aligned = align == ref_align and all(
        (a - b) % align == 0
        for a, b in ((offset, ref_offset), (stride_b, ref_stride_b), (stride_t, ref_stride_t)))
    return (base, ref_base), (offset, stride_b, stride_t, ref_offset, ref_stride_b,
                              ref_stride_t), dict(ALIGN=align, REF_ALIGNED=ref_aligned)


class _KLFull(torch.autograd.Function):
    # Saves both logits (the inputs themselves, no copy) and five floats per row. The backward
    # allocates one tensor: the gradient, in the policy logits' shape, dtype and layout.

    @staticmethod
    def forward(ctx, logits, ref_logits, temperature):
        assert logits.shape == ref_logits.shape, "logits and ref_logits must have the same shape"
        rows = rows_view(logits)  # (B, T, V)
        bases, strides, flags = _launch_args(rows, rows_view(ref_logits))
        B, T, V = rows.shape
        # kl is a tensor of its own, not a view, so that callers may modify it in place
        kl = torch.empty(logits.shape[:-1], device=logits.device)
        stats = torch.empty(4, B * T, device=logits.device).unbind()  # max, log_sum, ref_...
        if B * T > 0:
            _fwd_kernel[(B * T,)](*bases, kl, *stats, *strides, T, V, 1.0 / temperature, **flags)
        # a copy of kl (O(rows)) is saved, so that the caller may still modify kl in place
        ctx.save_for_backward(logits, ref_logits, kl.clone(), *stats)
        ctx.temperature = temperature
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        logits, ref_logits, *stats = ctx.saved_tensors
        rows, grad_rows = rows_and_grad(logits)
        bases, strides, flags = _launch_args(rows, rows_view(ref_logits))
        B, T, V = rows.shape
        if B * T > 0:
            _bwd_kernel[(B * T,)](*bases, *stats, grad_kl.reshape(-1).float().contiguous(),
                                  row_args(grad_rows)[0], *strides, T, V, 1.0 / ctx.temperature,
                                  **flags)
        return grad_rows.view(logits.shape), None, None  # the reference is frozen: no gradient


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
    differentiable in `logits` only. The Triton path reads each logits tensor once forward."""
    if not use_triton(logits):
        return kl_full_ref(logits, ref_logits, temperature=temperature)
    return _KLFull.apply(logits, ref_logits, float(temperature))
