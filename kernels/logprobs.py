"""token_logprobs: the log-probability of each target token under softmax(logits / temperature),
and the entropy of that softmax. PPO needs both on every minibatch, with gradient.

Shapes: logits (..., V) flattened to N rows. Per row, with z the logits in fp32 (exact for every
input dtype), m = max_v z_v and 1/T the reciprocal of the temperature, so that x_v - max x =
(z_v - m) / T for x = z / T:
    s = sum_v exp((z_v - m) / T),  p = softmax(z / T)
    logprob = (z_target - m) / T - log s
    entropy = -sum_v p_v log p_v = log s - (1/T) sum_v p_v (z_v - m)
The forward reads each row once in chunks of BLOCK_V, updating m and s as it goes (the online
softmax of Milakov & Gimelshein 2018), so any V works with a fixed block and nothing of size V is
written. Everything is taken relative to m, never through lse = m + log s: at logits of 1e4 the
fp32 spacing is 1e-3, and z - lse would lose the log-probability's low digits.

Differences first, the temperature after. At logits of 1e4 and T = 0.7, x = z / T is ~14286,
where fp32 values are 2**-10 ~ 1e-3 apart. An earlier version computed x first and x - m after;
its gradient at the max (exactly 0 there) relied on x_target, the running max m and the backward's
recomputed x at the same column being the same float, which the interpreter (numpy, IEEE division,
no fused multiply-add) guarantees and compiled code does not: on an H100 the gradient was up to
8e-4 off at T = 0.7 only. Compiled Triton divides tensors with an approximate instruction
(div.full.f32, which differs from IEEE division on 9% of values there), a scalar division can be
lowered to a different one, and the compiler may fuse a product into the subtraction after it;
any of these makes one value round two ways, and one ulp of x is e^(-1e-3) ~ 0.999 for p at the
max. Here what must be exactly 0 at the max, z_target - m, is the difference of two loaded values:
an IEEE subtraction with no product before it to fuse, the same in scalar and vector code, forward
and backward. The scale comes after, as a product with one reciprocal computed on the host (no
division by T anywhere), so its rounding is relative to the difference, not to the logit.
test_shift_invariant checks it: logits + 4096 give the same bits as the logits.
"""

import torch
import triton
import triton.language as tl

from kernels._common import row_pointer, rows_view, use_triton

BLOCK_V = 4096  # elements of a row per loop step; a power of two, as tl.arange needs


@triton.jit
def _fwd_kernel(logits_ptr, targets_ptr, logprobs_ptr, entropy_ptr, max_ptr, log_sum_ptr,
                stride_b, stride_t, T, V, inv_temperature, BLOCK_V: tl.constexpr):
    # one program per row; reads V logits and a target, writes 4 floats
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31 at N*V > 2e9
    row_ptr = row_pointer(logits_ptr, row, T, stride_b, stride_t)
    target = tl.load(targets_ptr + row)
    z_target = tl.load(row_ptr + target).to(tl.float32)
    offs = tl.arange(0, BLOCK_V)
    # Running max m, s = sum exp((z - m) / T) and w = sum exp((z - m) / T) (z - m), so that
    # entropy = log s - (w / s) / T. m starts at z_target, a value of the row, so that the first
    # rescale multiplies finite numbers.
    m = z_target
    s = 0.0
    w = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        in_row = cols < V
        z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp((m - m_new) * inv_temperature)  # rescales the sums so far to the new max
        p = tl.exp((z - m_new) * inv_temperature)  # 0 past the end of the row
        # each old term exp(.)(z - m) becomes alpha exp(.)(z - m + m - m_new)
        w = alpha * (w + (m - m_new) * s) + tl.sum(p * tl.where(in_row, z - m_new, 0.0), axis=0)
        s = alpha * s + tl.sum(p, axis=0)
        m = m_new
    log_s = tl.log(s)
    tl.store(logprobs_ptr + row, (z_target - m) * inv_temperature - log_s)
    tl.store(entropy_ptr + row, log_s - inv_temperature * w / s)
    tl.store(max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_s)


@triton.jit
def _bwd_kernel(logits_ptr, targets_ptr, entropy_ptr, max_ptr, log_sum_ptr, grad_logprobs_ptr,
                grad_entropy_ptr, grad_logits_ptr, stride_b, stride_t, T, V, inv_temperature,
                BLOCK_V: tl.constexpr):
    # one program per row; reads V logits and 6 floats, writes V gradients in the logits' dtype.
    #   d logprob / d x_v = [v == target] - p_v
    #   d entropy / d x_v = -p_v (log p_v + entropy)
    # and d / d z = (d / d x) / T.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = row_pointer(logits_ptr, row, T, stride_b, stride_t)
    grad_row_ptr = grad_logits_ptr + row * V  # the gradient is allocated contiguous
    target = tl.load(targets_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    m = tl.load(max_ptr + row)
    log_s = tl.load(log_sum_ptr + row)
    grad_logprob = tl.load(grad_logprobs_ptr + row)
    grad_entropy = tl.load(grad_entropy_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        in_row = cols < V
        z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        logp = (z - m) * inv_temperature - log_s
        p = tl.where(in_row, tl.exp(logp), 0.0)  # so that masked lanes stay finite
        grad = grad_logprob * (tl.where(cols == target, 1.0, 0.0) - p)
        grad -= grad_entropy * p * (logp + entropy)
        grad *= inv_temperature
        tl.store(grad_row_ptr + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


def _block(V):
    # at least 16 lanes: narrower blocks save nothing and are the compiler's least-trodden path
    return min(BLOCK_V, max(16, triton.next_power_of_2(V)))


class _TokenLogprobs(torch.autograd.Function):
    # Saves the logits (the input itself, no copy), the targets and three floats per row (entropy,
    # max, log of the sum). The backward allocates one tensor of the logits' size: the gradient,
    # in their dtype.

    @staticmethod
    def forward(ctx, logits, targets, temperature):
        rows = rows_view(logits)  # (B, T, V)
        B, T, V = rows.shape
        targets = targets.reshape(-1).contiguous()  # (N,)
        assert targets.numel() == B * T, "targets must have the logits' leading shape"
        # outputs are tensors of their own, not views, so that callers may modify them in place
        logprobs = torch.empty(logits.shape[:-1], device=logits.device)
        entropy = torch.empty(logits.shape[:-1], device=logits.device)
        row_max, log_sum = torch.empty(2, B * T, device=logits.device).unbind()
        if B * T > 0:
            _fwd_kernel[(B * T,)](rows, targets, logprobs, entropy, row_max, log_sum,
                                  rows.stride(0), rows.stride(1), T, V, 1.0 / temperature,
                                  BLOCK_V=_block(V), num_warps=8)
        # a copy of the entropy (O(rows)) is saved, so that the caller may modify it in place
        ctx.save_for_backward(logits, targets, entropy.clone(), row_max, log_sum)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, targets, entropy, row_max, log_sum = ctx.saved_tensors
        rows = rows_view(logits)
        B, T, V = rows.shape
        # an output that does not reach the loss contributes nothing: zeros, O(rows)
        grad_logprobs = torch.zeros_like(log_sum) if grad_logprobs is None else grad_logprobs
        grad_entropy = torch.zeros_like(log_sum) if grad_entropy is None else grad_entropy
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        if B * T > 0:
            _bwd_kernel[(B * T,)](rows, targets, entropy, row_max, log_sum,
                                  grad_logprobs.reshape(-1).float().contiguous(),
                                  grad_entropy.reshape(-1).float().contiguous(), grad_logits,
                                  rows.stride(0), rows.stride(1), T, V, 1.0 / ctx.temperature,
                                  BLOCK_V=_block(V), num_warps=8)
        return grad_logits, None, None


def token_logprobs_ref(logits, targets, *, temperature=1.0, return_entropy=False):
    """Reference. logits (..., V) of any float dtype, targets (...) int64 -> fp32 (...).

    Reads N*V elements but writes several fp32 (N, V) tensors (the upcast, the division, the
    log-softmax, its exp) and autograd keeps some for the backward: for N = 16384, V = 128256,
    each one is 8 GiB.
    """
    logprobs_all = torch.log_softmax(logits.float() / temperature, dim=-1)  # (..., V)
    logprobs = logprobs_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (...)
    if not return_entropy:
        return logprobs
    entropy = -(logprobs_all.exp() * logprobs_all).sum(-1)  # (...)
    return logprobs, entropy


def token_logprobs(logits, targets, *, temperature=1.0, return_entropy=False):
    """log softmax(logits / temperature) at `targets` (each in [0, V)), fp32 with the logits'
    leading shape; with return_entropy=True, the tuple (logprobs, entropy). Differentiable in the
    logits through both. The Triton path reads the logits once forward and once backward."""
    if not use_triton(logits):
        return token_logprobs_ref(logits, targets, temperature=temperature,
                                  return_entropy=return_entropy)
    logprobs, entropy = _TokenLogprobs.apply(logits, targets, float(temperature))
    return (logprobs, entropy) if return_entropy else logprobs
