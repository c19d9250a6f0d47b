"""kl_full: the exact KL(policy || reference) per token, summed over the whole vocabulary.

With z = logits and y = ref_logits in fp32, 1/T the reciprocal of the temperature,
p = softmax(z / T), q = softmax(y / T), m = max z, s = sum exp((z - m) / T), and ref_m, ref_s the
same for y, per row
    log p_v - log q_v = ((z_v - m) - (y_v - ref_m)) / T - (log s - log ref_s)
    KL = sum_v p_v (log p_v - log q_v) = (u / s) / T - (log s - log ref_s),
    u  = sum_v exp((z_v - m) / T) ((z_v - m) - (y_v - ref_m))
The forward reads both rows once in chunks, keeping running maxima and sums for both (the online
softmax, as in logprobs.py) and u, rescaled whenever a max grows. Every difference is taken
relative to the maxima, never through lse = m + log s or z - y: at logits of 1e4 the fp32 spacing
is 1e-3, which would swamp a small KL between two large, nearly equal rows. And differences are
taken in the logits' own units, scaled by 1/T only after, as logprobs.py explains: the version that
divided first gave KL(p || p), exactly 0 with gradient 0, gradients up to 5e-4 on an H100 at
T = 0.7; here (z - m) - (y - ref_m) is exactly 0 when z == y, whatever the compiler does.
"""

import torch
import triton
import triton.language as tl

from kernels._common import row_pointer, rows_view, use_triton

BLOCK_V = 4096  # elements of a row per loop step; a power of two, as tl.arange needs


@triton.jit
def _fwd_kernel(logits_ptr, ref_ptr, kl_ptr, max_ptr, log_sum_ptr, ref_max_ptr, ref_log_sum_ptr,
                stride_b, stride_t, ref_stride_b, ref_stride_t, T, V, inv_temperature,
                BLOCK_V: tl.constexpr):
    # one program per row; reads 2 * V logits, writes 5 floats
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31 at N*V > 2e9
    row_ptr = row_pointer(logits_ptr, row, T, stride_b, stride_t)
    ref_row_ptr = row_pointer(ref_ptr, row, T, ref_stride_b, ref_stride_t)
    offs = tl.arange(0, BLOCK_V)
    # the maxima start at the rows' first values, so that the first rescale multiplies finite ones
    m = tl.load(row_ptr).to(tl.float32)  # running max of z
    ref_m = tl.load(ref_row_ptr).to(tl.float32)  # running max of y
    s = 0.0  # sum exp((z - m) / T)
    ref_s = 0.0  # sum exp((y - ref_m) / T)
    u = 0.0  # sum exp((z - m) / T) ((z - m) - (y - ref_m))
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        in_row = cols < V
        z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        y = tl.load(ref_row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(tl.where(in_row, z, float("-inf")), axis=0))
        ref_m_new = tl.maximum(ref_m, tl.max(tl.where(in_row, y, float("-inf")), axis=0))
        alpha = tl.exp((m - m_new) * inv_temperature)  # rescales the sums so far to the new max
        # exp(-inf) = 0 past the row (there exp(0 - max) could overflow)
        p = tl.exp(tl.where(in_row, z - m_new, float("-inf")) * inv_temperature)
        ref_p = tl.exp(tl.where(in_row, y - ref_m_new, float("-inf")) * inv_temperature)
        # each old term of u gains (ref_m_new - ref_m) - (m_new - m) and the factor alpha
        u = alpha * (u + ((ref_m_new - ref_m) - (m_new - m)) * s)
        u += tl.sum(p * ((z - m_new) - (y - ref_m_new)), axis=0)
        s = alpha * s + tl.sum(p, axis=0)
        ref_s = tl.exp((ref_m - ref_m_new) * inv_temperature) * ref_s + tl.sum(ref_p, axis=0)
        m = m_new
        ref_m = ref_m_new
    log_s = tl.log(s)
    ref_log_s = tl.log(ref_s)
    tl.store(kl_ptr + row, inv_temperature * u / s - (log_s - ref_log_s))
    tl.store(max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_s)
    tl.store(ref_max_ptr + row, ref_m)
    tl.store(ref_log_sum_ptr + row, ref_log_s)


@triton.jit
def _bwd_kernel(logits_ptr, ref_ptr, kl_ptr, max_ptr, log_sum_ptr, ref_max_ptr, ref_log_sum_ptr,
                grad_kl_ptr, grad_logits_ptr, stride_b, stride_t, ref_stride_b, ref_stride_t, T,
                V, inv_temperature, BLOCK_V: tl.constexpr):
    # one program per row; reads 2 * V logits and 6 floats, writes V gradients (logits' dtype).
    #   d KL / d x_v = p_v (log p_v - log q_v - KL),  and d / d z = (d / d x) / T
    row = tl.program_id(0).to(tl.int64)
    row_ptr = row_pointer(logits_ptr, row, T, stride_b, stride_t)
    ref_row_ptr = row_pointer(ref_ptr, row, T, ref_stride_b, ref_stride_t)
    grad_row_ptr = grad_logits_ptr + row * V  # the gradient is allocated contiguous
    kl = tl.load(kl_ptr + row)
    m = tl.load(max_ptr + row)
    log_s = tl.load(log_sum_ptr + row)
    ref_m = tl.load(ref_max_ptr + row)
    ref_log_s = tl.load(ref_log_sum_ptr + row)
    grad_kl = tl.load(grad_kl_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        in_row = cols < V
        # z = -inf past the row: p = 0 there, so that lanes not stored stay finite
        z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        y = tl.load(ref_row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        p = tl.exp((z - m) * inv_temperature - log_s)
        log_ratio = ((z - m) - (y - ref_m)) * inv_temperature - (log_s - ref_log_s)  # log p - log q
        grad = grad_kl * p * tl.where(in_row, log_ratio - kl, 0.0) * inv_temperature
        tl.store(grad_row_ptr + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


def _block(V):
    # at least 16 lanes: narrower blocks save nothing and are the compiler's least-trodden path
    return min(BLOCK_V, max(16, triton.next_power_of_2(V)))


class _KLFull(torch.autograd.Function):
    # Saves both logits (the inputs themselves, no copy) and five floats per row. The backward
    # allocates one tensor: the gradient, in the policy logits' shape and dtype.

    @staticmethod
    def forward(ctx, logits, ref_logits, temperature):
        assert logits.shape == ref_logits.shape, "logits and ref_logits must have the same shape"
        rows, ref_rows = rows_view(logits), rows_view(ref_logits)  # (B, T, V)
        B, T, V = rows.shape
        # kl is a tensor of its own, not a view, so that callers may modify it in place
        kl = torch.empty(logits.shape[:-1], device=logits.device)
        stats = torch.empty(4, B * T, device=logits.device).unbind()  # max, log_sum, ref_...
        if B * T > 0:
            _fwd_kernel[(B * T,)](rows, ref_rows, kl, *stats, *rows.stride()[:2],
                                  *ref_rows.stride()[:2], T, V, 1.0 / temperature,
                                  BLOCK_V=_block(V), num_warps=8)
        # a copy of kl (O(rows)) is saved, so that the caller may still modify kl in place
        ctx.save_for_backward(logits, ref_logits, kl.clone(), *stats)
        ctx.temperature = temperature
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        logits, ref_logits, *stats = ctx.saved_tensors
        rows, ref_rows = rows_view(logits), rows_view(ref_logits)
        B, T, V = rows.shape
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        if B * T > 0:
            _bwd_kernel[(B * T,)](rows, ref_rows, *stats, grad_kl.reshape(-1).float().contiguous(),
                                  grad_logits, *rows.stride()[:2], *ref_rows.stride()[:2], T, V,
                                  1.0 / ctx.temperature, BLOCK_V=_block(V), num_warps=8)
        return grad_logits, None, None  # the reference model is frozen: no gradient for it


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
