"""token_logprobs: the log-probability of each target token under softmax(logits / temperature),
and the entropy of that softmax. PPO needs both on every minibatch, with gradient.

Shapes: logits (..., V) flattened to N rows. Per row, with z the logits in fp32 (exact for every
input dtype), m = max_v z_v and 1/T the reciprocal of the temperature, so that x_v - max x =
(z_v - m) / T for x = z / T:
    s = sum_v exp((z_v - m) / T),  p = softmax(z / T)
    logprob = (z_target - m) / T - log s
    entropy = -sum_v p_v log p_v = log s - (1/T) sum_v p_v (z_v - m)
The forward reads each row once in blocks of BLOCK_V, updating m and s as it goes (the online
softmax of Milakov & Gimelshein 2018), so any V works with a fixed block and nothing of size V is
written. Everything is taken relative to m, never through lse = m + log s: at logits of 1e4 the
fp32 spacing is 1e-3, and z - lse would lose the log-probability's low digits.

Wide loads at any V: the blocks are aligned to 16 bytes and loaded unmasked; only the few columns
before the first boundary and after the last whole block are masked (_common.row_blocks). A mask
`cols < V` on every load, at V = 50257 (not a multiple of 8), made every load a scalar one: 56% of
copy bandwidth on an H100, against 78% at V = 50304. Rows at any offset (full[..., :V] of a padded
vocabulary, logits[:, :-1]) are read in place, and the gradient is written in the logits' own
layout, so that its blocks are aligned where theirs are.

Differences first, the temperature after. At logits of 1e4 and T = 0.7, x = z / T is ~14286,
where fp32 values are 2**-10 ~ 1e-3 apart. An earlier version computed x first and subtracted the
max after. On an H100 its gradients at T = 0.7 were off by up to 8e-4 where the exact ones are 0
(at T = 1, where x = z exactly, they were right), while the interpreter, which rounds every
operation once (numpy), passed. The forward was right and the backward wrong; and kl_full(z, z),
whose x and y go through the same code on the same values, got a nonzero gradient. No division
that rounds each quotient one fixed way, IEEE or approximate (compiled Triton's tensor `/` is
div.full.f32, which differs from IEEE div.rn.f32 on 9% of values there), can do that: the same
quotient must have been rounded at one use and not at another. ptxas may fuse the multiply that
ends a division into the subtraction after it (x - m as one FMA), per use and per kernel; then
x - m at the max is 0 in one place and the quotient's rounding error (up to half an ulp, 5e-4) in
another, and p = exp(5e-4) at the max is the error seen. Here what must be exactly 0 at the max,
z_target - m (and kl.py's (z - m) - (y - ref_m)), is a difference of loaded values: no product
before it to fuse, no division, the same bits in every kernel and in scalar or vector code. One
reciprocal 1/T, computed on the host, multiplies the differences after, where fusing or not
changes a result by a rounding of the difference (0 at the max), not of the logit.
test_shift_invariant checks it: logits + 4096 give the same bits as the logits.
"""

import torch

from kernels._common import (launch_config, row_args, row_config, row_start, rows_and_grad,
                             rows_view, rest_columns, row_blocks, tl, triton, use_triton,
                             write_row_grad)

# One program per row, looping over it in blocks of BLOCK_V columns. A GPU runs blocks of BLOCK_V
# (a shorter row, the next power of two) with _common.row_config's warps, whatever the shape;
# MINRLHF_AUTOTUNE=1 times CONFIGS instead, once per V. Bigger blocks and more warps keep more
# bytes in flight per SM. The interpreter uses INTERPRET_BLOCK_V the same way.
CONFIGS = [triton.Config({"BLOCK_V": block}, num_warps=warps, num_stages=stages)
           for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))
           for stages in (1, 2)]
BLOCK_V = 4096
INTERPRET_BLOCK_V = 4096
# Arguments that change with the batch (its T, the rows' offsets and strides, the addresses of
# per-row values) are not specialised on (an int divisible by 16 or equal to 1, an address
# divisible by 16): a new one would compile the kernel again. The wide loads do not need them:
# ALIGN says where the aligned blocks start, and per-row values are loaded one at a time.
ROW_ARGS = ["offset", "stride_b", "stride_t", "T", "V"]


def _gpu_config(args):
    return row_config(args["V"], BLOCK_V)


def _interpret_config(args):
    return row_config(args["V"], INTERPRET_BLOCK_V)


@triton.jit
def _fwd_update(z, m, s, w, inv_temperature):
    # One block of a row: z (BLOCK_V,) fp32, -inf in masked lanes. m is the row's max so far (a
    # scalar); s = sum exp((z - m) / T) and w = sum exp((z - m) / T) (z - m) are kept per lane,
    # over the columns each lane has seen, and added up across lanes once, after the row: one
    # reduction across the program per block (the max) instead of three. Returns them at the new
    # max.
    m_new = tl.maximum(m, tl.max(z, axis=0))
    alpha = tl.exp((m - m_new) * inv_temperature)  # rescales the sums so far to the new max
    d = z - m_new
    p = tl.exp(d * inv_temperature)  # 0 in masked lanes
    # each old term exp(.)(z - m) becomes alpha exp(.)(z - m + m - m_new); where p is 0 (masked
    # lanes, or logits of -inf), its term is 0, not 0 * -inf
    w = alpha * (w + (m - m_new) * s) + p * tl.where(p > 0, d, 0.0)
    s = alpha * s + p
    return m_new, s, w


@launch_config(CONFIGS, key=["V"], gpu=_gpu_config, interpret=_interpret_config)
@triton.jit(do_not_specialize=ROW_ARGS + ["targets_ptr", "logprobs_ptr", "entropy_ptr", "max_ptr",
                                         "log_sum_ptr"])
def _fwd_kernel(logits_ptr, targets_ptr, logprobs_ptr, entropy_ptr, max_ptr, log_sum_ptr,
                offset, stride_b, stride_t, T, V, inv_temperature,
                ALIGN: tl.constexpr, BLOCK_V: tl.constexpr):
    # one program per row; reads V logits and a target, writes 4 floats
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31 at N*V > 2e9
    start = row_start(row, offset, T, stride_b, stride_t)
    z_target = tl.load(logits_ptr + start + tl.load(targets_ptr + row)).to(tl.float32)
    # m starts at z_target, a value of the row, so that the first rescale multiplies finite numbers
    m = z_target
    s = tl.zeros((BLOCK_V,), tl.float32)
    w = tl.zeros((BLOCK_V,), tl.float32)
    head, n_full = row_blocks(start, V, ALIGN, BLOCK_V)
    for i in range(n_full):
        block = tl.multiple_of(start + head + i * BLOCK_V, ALIGN) + tl.arange(0, BLOCK_V)
        m, s, w = _fwd_update(tl.load(logits_ptr + block).to(tl.float32), m, s, w,
                              inv_temperature)
    for r in range(0, V - n_full * BLOCK_V, BLOCK_V):
        cols, in_row = rest_columns(r, head, n_full, V, BLOCK_V)
        z = tl.load(logits_ptr + start + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        m, s, w = _fwd_update(z, m, s, w, inv_temperature)
    s = tl.sum(s, axis=0)
    log_s = tl.log(s)
    tl.store(logprobs_ptr + row, (z_target - m) * inv_temperature - log_s)
    tl.store(entropy_ptr + row, log_s - inv_temperature * tl.sum(w, axis=0) / s)
    tl.store(max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_s)


@triton.jit
def _block_grad(z, cols, col0, in_row, row_values, WHOLE: tl.constexpr, ALIGN: tl.constexpr,
                BLOCK_V: tl.constexpr, OPTION: tl.constexpr):
    # The gradient of one block (see _common.write_row_grad):
    #   d logprob / d x_v = [v == target] - p_v
    #   d entropy / d x_v = -p_v (log p_v + entropy)
    # and d / d z = (d / d x) / T.
    target, m, log_s, entropy, grad_logprob, grad_entropy, inv_temperature = row_values
    logp = (z - m) * inv_temperature - log_s
    p = tl.exp(logp)
    grad = grad_logprob * (tl.where(cols == target, 1.0, 0.0) - p)
    grad -= grad_entropy * p * tl.where(p > 0, logp + entropy, 0.0)  # 0, not 0 * -inf
    return grad * inv_temperature


@launch_config(CONFIGS, key=["V"], gpu=_gpu_config, interpret=_interpret_config)
@triton.jit(do_not_specialize=ROW_ARGS + ["targets_ptr", "entropy_ptr", "max_ptr", "log_sum_ptr",
                                         "grad_logprobs_ptr", "grad_entropy_ptr"])
def _bwd_kernel(logits_ptr, targets_ptr, entropy_ptr, max_ptr, log_sum_ptr, grad_logprobs_ptr,
                grad_entropy_ptr, grad_logits_ptr, offset, stride_b, stride_t, T, V,
                inv_temperature, ALIGN: tl.constexpr, BLOCK_V: tl.constexpr):
    # One program per row; reads V logits and 6 floats, writes V gradients in the logits' dtype.
    # The gradient has the logits' layout (rows_and_grad), so both use the same aligned blocks;
    # it may be the logits themselves (each block is read before it is written).
    row = tl.program_id(0).to(tl.int64)
    row_values = (tl.load(targets_ptr + row), tl.load(max_ptr + row), tl.load(log_sum_ptr + row),
                  tl.load(entropy_ptr + row), tl.load(grad_logprobs_ptr + row),
                  tl.load(grad_entropy_ptr + row), inv_temperature)
    write_row_grad(_block_grad, row_values, logits_ptr, grad_logits_ptr,
                   row_start(row, offset, T, stride_b, stride_t), V, ALIGN, BLOCK_V, None)


def forward_rows(logits, targets, temperature):
    """The forward kernel's launch: logits (..., V), targets (...) -> fp32 logprobs and entropy
    (...), and the row max and log of the sum that the backward needs, (N,) each."""
    rows = rows_view(logits)  # (B, T, V)
    B, T, V = rows.shape
    targets = targets.reshape(-1).contiguous()  # (N,)
    assert targets.numel() == B * T, "targets must have the logits' leading shape"
    # outputs are tensors of their own, not views, so that callers may modify them in place
    logprobs = torch.empty(logits.shape[:-1], device=logits.device)
    entropy = torch.empty(logits.shape[:-1], device=logits.device)
    row_max, log_sum = torch.empty(2, B * T, device=logits.device).unbind()
    if B * T > 0:
        base, offset, stride_b, stride_t, align = row_args(rows)
        _fwd_kernel[(B * T,)](base, targets, logprobs, entropy, row_max, log_sum, offset,
                              stride_b, stride_t, T, V, 1.0 / temperature, ALIGN=align)
    return logprobs, entropy, row_max, log_sum


def backward_rows(logits, targets, entropy, row_max, log_sum, grad_logprobs, grad_entropy,
                  temperature, grad_rows):
    """The backward kernel's launch: writes d loss / d logits into grad_rows, (B, T, V) in the
    layout of rows_view(logits) (rows_and_grad makes one; it may be those rows themselves, to
    overwrite the logits). grad_logprobs, grad_entropy: (...) or None for an output that does not
    reach the loss."""
    rows = rows_view(logits)
    B, T, V = rows.shape
    # an output that does not reach the loss contributes nothing: zeros, O(rows)
    grad_logprobs = torch.zeros_like(log_sum) if grad_logprobs is None else grad_logprobs
    grad_entropy = torch.zeros_like(log_sum) if grad_entropy is None else grad_entropy
    if B * T > 0:
        base, offset, stride_b, stride_t, align = row_args(rows)
        grad_base, *grad_layout = row_args(grad_rows)
        assert grad_layout == [offset, stride_b, stride_t, align], "grad_rows: the rows' layout"
        _bwd_kernel[(B * T,)](base, targets.reshape(-1), entropy.reshape(-1), row_max, log_sum,
                              grad_logprobs.reshape(-1).float().contiguous(),
                              grad_entropy.reshape(-1).float().contiguous(), grad_base,
                              offset, stride_b, stride_t, T, V, 1.0 / temperature, ALIGN=align)


class _TokenLogprobs(torch.autograd.Function):
    # Saves the logits (the input itself, no copy), the targets and three floats per row (entropy,
    # max, log of the sum). The backward allocates one tensor of the logits' size: the gradient,
    # in their dtype.

    @staticmethod
    def forward(ctx, logits, targets, temperature):
        logprobs, entropy, row_max, log_sum = forward_rows(logits, targets, temperature)
        # a copy of the entropy (O(rows)) is saved, so that the caller may modify it in place
        ctx.save_for_backward(logits, targets.reshape(-1).contiguous(), entropy.clone(), row_max,
                              log_sum)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, targets, entropy, row_max, log_sum = ctx.saved_tensors
        rows, grad_rows = rows_and_grad(logits)
        backward_rows(rows, targets, entropy, row_max, log_sum, grad_logprobs, grad_entropy,
                      ctx.temperature, grad_rows)
        return grad_rows.view(logits.shape), None, None


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
