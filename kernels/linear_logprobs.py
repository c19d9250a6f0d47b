"""linear_logprobs: token_logprobs of the logits hidden @ weight.T, straight from the hidden states
(N, H) and the lm_head weight (V, H), forward and backward; its fused path never holds more than a
chunk of the (N, V) logits. For N = 16384, V = 128256 those are 4 GiB in bf16 and twice that in
fp32, and `token_logprobs(hidden @ weight.T, targets)` holds them from the forward to the backward.

Two paths, chosen per call by memory. Where the logits of the vocabulary padded to a multiple of
128, (N, V_pad) in the compute dtype, fit in a budget (logits_budget_mib, or the environment's
MINRLHF_LOGITS_BUDGET_MIB, else LOGITS_BUDGET_MIB = 1 GiB), they are made by one cuBLAS matmul and
held for the backward (_LogitsLogprobs): token_logprobs's kernels give the log-probs, then
overwrite the logits with their gradient, and two cuBLAS matmuls give the gradients of hidden and
weight. That is three matmuls where the fused path below does four in Triton's tiles, which on an
H200 at N, H, V = 8192, 4096, 128256 took 69.4 ms, 1.40x its four-matmul floor, against 43.4 ms
for a matmul and token_logprobs (kernels_bench.txt of 2026-12-04). The padding is for cuBLAS:
at V = 50257 its matmul ran at 95 TFLOP/s there, which that run's notes put down to the
unaligned vocabulary (not measured padded). Those logits round to the compute dtype (bf16 under
autocast) as the model's unfused path rounds them; the fused path keeps them in fp32. Larger
batches (an SFT batch of 32 x 1024 tokens: 3.3 GB at V = 50304) take the fused path, whose
memory stays at a chunk. 1 GiB holds a PPO minibatch of 16 x 128 tokens at V = 128256 (0.5 GiB)
and is about 1% of an 80 GB card; the budget is a guess about what a run can spare, not a
measured crossover.

The fused path follows.

Math as in logprobs.py, with z = hidden @ weight.T in fp32 and everything relative to the row max m
in the logits' own units, scaled by 1/T after (logprobs.py says why):
    logprob = (z_target - m) / T - log s,  s = sum_v exp((z_v - m) / T)
    entropy = log s - (1/T) sum_v p_v (z_v - m)
    d loss / d z_v = (g_logprob ([v = target] - p_v) - g_entropy p_v (log p_v + entropy)) / T
    d hidden = dz @ weight,  d weight = dz.T @ hidden

Forward (_fwd_kernel): a program owns BLOCK_N rows and one of `splits` parts of the vocabulary.
For each BLOCK_V-wide tile of its part it computes the (BLOCK_N, BLOCK_V) logits with tl.dot over
H in BLOCK_K steps (fp32 accumulator) and updates per-row running max, sum, entropy sum and the
target's logit (the online softmax of Milakov & Gimelshein 2018); nothing of size V is written.
The splits give at least two programs per SM when N / BLOCK_N alone would not (N = 8192 is 64 row
blocks on an H100's 132 SMs); their per-row partial statistics, (4, splits, N) floats, are
combined in PyTorch. Saved for the backward: hidden, weight, targets and 3 floats per row.

Backward, over the vocabulary in chunks of Vc columns (Vc * N elements <= SCRATCH_BYTES):
  1. _dlogits_kernel, a program per (BLOCK_N rows, BLOCK_V columns of the chunk): recomputes its
     logits tile from hidden and weight (the one recompute) and writes d loss / d z there, from the
     saved max and log-sum, into an (N, Vc) buffer in the compute dtype. That rounding is the one
     the unfused path has too: token_logprobs's backward writes the logits' gradient in their
     dtype before the lm_head's backward matmuls read it.
  2. _grads_kernel, one launch with two kinds of programs, so that neither waits on the other:
     - d weight: a program per (BLOCK_M rows of the chunk, BLOCK_H columns of H) reduces over all
       N rows in registers (fp32) and writes those rows of the weight's gradient once. Complete
       per chunk: no (V, H) fp32 accumulator (154 MB at V = 50257, H = 768; 2.1 GB at 128256,
       4096) and no atomics.
     - d hidden: a program per (BLOCK_M rows, BLOCK_H columns) adds dz_chunk @ weight_chunk to an
       fp32 (N, H) accumulator that only it touches (read, add, write: no atomics). The last chunk
       writes the result in hidden's dtype. No accumulator when hidden is fp32 (the gradient is
       it) or when V fits in one chunk.
That is four matmuls of 2NHV flops (forward, recompute, d hidden, d weight), the floor for one
recompute. The traffic beyond them: the chunk buffer, written once and read twice (6NV bytes in
all at bf16; 32 MiB fits an H100's L2), and the d hidden accumulator, read and written once per
chunk (8NH bytes per chunk: at N = 16384, H = 768 and Vc = 1024, 50 chunks of 100 MB). The
alternative, Cut Cross-Entropy's, recomputes each (rows, columns) tile once and adds both
gradients with atomics: N V H (1/BLOCK_N + 1/BLOCK_V) additions, ~40 GB of fp32 atomics at
N = 16384, V = 50257, H = 768, where its exact mode took 23.7 ms on an H100; its filtered mode
skips small gradient tiles, which this op does not (exact). Deterministic: no atomics, so the
same inputs give the same bits for a given tile configuration.

Memory beyond inputs and gradients: the chunk buffer (<= SCRATCH_BYTES), the fp32 d hidden
accumulator (4NH bytes, when hidden is 16-bit and V > Vc) and O(N) statistics: at N = 16384,
H = 768 in bf16 that is 33.5 + 50.3 MB.

Precision. bf16 and fp16 tiles go to tensor cores, whose products are exact and sums fp32. For
fp32 inputs tl.dot would use TF32 on a GPU by default (a 10-bit mantissa: logits off by ~1e-3
relatively); here it follows PyTorch's own setting for fp32 matmuls, so the kernel computes what
F.linear would: IEEE fp32 under torch's default "highest", TF32 when the user allowed it
(torch.set_float32_matmul_precision("high")). Under torch.autocast, as in the PPO loop, hidden
(LayerNorm output, fp32) and the fp32 weight are first cast to the autocast dtype, as F.linear
would, and their gradients flow back through the casts to fp32. The backward recomputes the
forward's logits with the same tiles (with MINRLHF_AUTOTUNE=1 the two may pick different ones:
then they agree up to fp32 rounding, a relative error in p of a few ulps of |z| / T).
"""

import os

import torch
import torch.nn.functional as F

from kernels._common import INTERPRET, launch_config, rows_view, tl, triton, use_triton
from kernels.logprobs import backward_rows, forward_rows, token_logprobs_ref

SCRATCH_BYTES = 32 * 2**20  # the backward's chunk of d loss / d logits
CHUNK_MULTIPLE = 256  # chunk widths are a multiple of every tile width
PROGRAMS_PER_SM = 2  # the forward splits the vocabulary until there are this many programs per SM
LOGITS_BUDGET_MIB = 1024  # the logits path's limit on its (N, V_pad) logits (module docstring)
VOCAB_MULTIPLE = 128  # the logits path pads the vocabulary to this, for cuBLAS

# What MINRLHF_AUTOTUNE=1 times per (H, V) (and dtype); BLOCK_K is the same everywhere, so that
# the forward and the backward add up the H products of a logit in the same order.
_TILES = ((128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 256, 8, 3),
          (64, 64, 4, 2))
FWD_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_K": 64}, num_warps=warps,
                             num_stages=stages) for n, v, warps, stages in _TILES]
GRAD_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_H": h, "BLOCK_K": 64}, num_warps=warps,
                              num_stages=stages) for m, h, warps, stages in _TILES]
# What a GPU runs otherwise, whatever the shape, by the inputs' element size: 128 x 128 tiles for
# 16-bit inputs (96 KiB of shared memory over 3 stages), 64 x 64 for fp32 ones (64 KiB over 2;
# 128 x 256 in fp32 would need 288 KiB, more than any GPU has). Not tuned: defaults.
TILES = {2: dict(BLOCK_N=128, BLOCK_V=128, BLOCK_M=128, BLOCK_H=128, BLOCK_K=64, num_warps=8,
                 num_stages=3),
         4: dict(BLOCK_N=64, BLOCK_V=64, BLOCK_M=64, BLOCK_H=64, BLOCK_K=64, num_warps=4,
                 num_stages=2)}
# The interpreter's tiles: small, so that the tests' small shapes still span several of them.
INTERPRET_TILES = {"BLOCK_N": 16, "BLOCK_V": 16, "BLOCK_M": 16, "BLOCK_H": 16, "BLOCK_K": 16}

# The interpreter multiplies bf16 tiles wrongly in tl.dot; it gets them in fp32, exactly (products
# of two 16-bit floats fit in fp32's 24 bits), which the GPU's tensor cores also compute.
_UPCAST_DOT = tl.constexpr(INTERPRET)


def _gpu_tiles(args):
    return TILES[args["h_ptr"].element_size()]


def _interpret_tiles(args):
    return INTERPRET_TILES


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    if _UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, N, V, H, stride_hn, stride_wv, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # (BLOCK_N, BLOCK_V) fp32: hidden[rows] @ weight[cols].T, over H in steps of BLOCK_K; rows
    # and cols (int64) past N or V read zeros
    z = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k in range(0, H, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :],
                    mask=(rows[:, None] < N) & (ks[None, :] < H), other=0.0)  # (BLOCK_N, BLOCK_K)
        w = tl.load(w_ptr + cols[None, :] * stride_wv + ks[:, None],
                    mask=(cols[None, :] < V) & (ks[:, None] < H), other=0.0)  # (BLOCK_K, BLOCK_V)
        z = _dot(h, w, z, PRECISION)
    return z


# N, the batch's number of rows, and the addresses of per-row values are not specialised on
# (an int divisible by 16 or equal to 1, an address divisible by 16), so that a new batch does
# not compile the kernels again; N only bounds masks across rows, which do not narrow the loads.
# H and V are fixed through a run.
@launch_config(FWD_CONFIGS, key=["H", "V"], gpu=_gpu_tiles, interpret=_interpret_tiles)
@triton.jit(do_not_specialize=["N", "targets_ptr", "stats_ptr"])
def _fwd_kernel(h_ptr, w_ptr, targets_ptr, stats_ptr, N, H, V, stride_hn, stride_wv,
                inv_temperature, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # Program (row block, split): BLOCK_N rows against the split's tiles of the vocabulary. Writes
    # per row its partial max m, s = sum exp((z - m) / T), w = sum exp((z - m) / T) (z - m) and
    # the target's logit (0 if the target is in another split) to stats (4, splits, N).
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    targets = tl.load(targets_ptr + rows, mask=rows < N, other=-1)
    tiles = tl.cdiv(tl.cdiv(V, BLOCK_V), splits)  # per split; the last ones may have none
    v_start = split * tiles * BLOCK_V
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    w = tl.zeros((BLOCK_N,), tl.float32)
    z_target = tl.zeros((BLOCK_N,), tl.float32)
    for v in range(v_start, tl.minimum(v_start + tiles * BLOCK_V, V), BLOCK_V):
        cols = (v + tl.arange(0, BLOCK_V)).to(tl.int64)
        z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, H, stride_hn, stride_wv, PRECISION,
                         BLOCK_N, BLOCK_V, BLOCK_K)
        z = tl.where(cols[None, :] < V, z, float("-inf"))
        z_target += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp((m - m_new) * inv_temperature)  # 0 on the first tile, where m = -inf
        d = z - m_new[:, None]
        p = tl.exp(d * inv_temperature)
        # as in logprobs.py; where(s > 0): no -inf * 0 on the first tile
        w = alpha * (w + tl.where(s > 0, m - m_new, 0.0) * s)
        w += tl.sum(p * tl.where(p > 0, d, 0.0), axis=1)
        s = alpha * s + tl.sum(p, axis=1)
        m = m_new
    out = stats_ptr + split * N + rows
    in_rows = rows < N
    tl.store(out, m, mask=in_rows)
    tl.store(out + splits * N, s, mask=in_rows)
    tl.store(out + 2 * splits * N, w, mask=in_rows)
    tl.store(out + 3 * splits * N, z_target, mask=in_rows)


@launch_config(FWD_CONFIGS, key=["H", "V"], gpu=_gpu_tiles, interpret=_interpret_tiles)
@triton.jit(do_not_specialize=["N", "targets_ptr", "max_ptr", "log_sum_ptr", "entropy_ptr",
                               "grad_logprobs_ptr", "grad_entropy_ptr"])
def _dlogits_kernel(h_ptr, w_ptr, targets_ptr, max_ptr, log_sum_ptr, entropy_ptr,
                    grad_logprobs_ptr, grad_entropy_ptr, dlogits_ptr, N, H, V, v0, width,
                    stride_hn, stride_wv, stride_dn, inv_temperature, PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # Program (row block, column block of the chunk [v0, v0 + width)): recomputes its logits and
    # writes d loss / d z into dlogits (N, >= width), in that buffer's dtype; 0 past V.
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    chunk_cols = (tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    cols = v0 + chunk_cols
    in_rows = rows < N
    target = tl.load(targets_ptr + rows, mask=in_rows, other=-1)
    m = tl.load(max_ptr + rows, mask=in_rows, other=0.0)
    log_s = tl.load(log_sum_ptr + rows, mask=in_rows, other=0.0)
    entropy = tl.load(entropy_ptr + rows, mask=in_rows, other=0.0)
    grad_logprob = tl.load(grad_logprobs_ptr + rows, mask=in_rows, other=0.0)
    grad_entropy = tl.load(grad_entropy_ptr + rows, mask=in_rows, other=0.0)
    z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, H, stride_hn, stride_wv, PRECISION,
                     BLOCK_N, BLOCK_V, BLOCK_K)
    z = tl.where(cols[None, :] < V, z, float("-inf"))  # p = 0 past the vocabulary
    logp = (z - m[:, None]) * inv_temperature - log_s[:, None]
    p = tl.exp(logp)
    grad = grad_logprob[:, None] * (tl.where(cols[None, :] == target[:, None], 1.0, 0.0) - p)
    grad -= grad_entropy[:, None] * p * tl.where(p > 0, logp + entropy[:, None], 0.0)
    grad *= inv_temperature
    tl.store(dlogits_ptr + rows[:, None] * stride_dn + chunk_cols[None, :],
             grad.to(dlogits_ptr.dtype.element_ty),
             mask=in_rows[:, None] & (chunk_cols[None, :] < width))


@launch_config(GRAD_CONFIGS, key=["H", "V"], gpu=_gpu_tiles, interpret=_interpret_tiles,
               restore_value=["dh_acc_ptr"])
@triton.jit(do_not_specialize=["N"])
def _grads_kernel(dlogits_ptr, h_ptr, w_ptr, dw_ptr, dh_acc_ptr, dh_ptr, N, H, V, v0, width,
                  stride_hn, stride_wv, stride_dn, first, last, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    # The first cdiv(width, BLOCK_M) * cdiv(H, BLOCK_H) programs each write a tile of d weight for
    # the chunk's rows; the others each add a tile of d hidden (see the module's docstring). The
    # chunk's columns past V hold zeros. first and last (the chunk's place) are runtime values,
    # not constexprs: one compiled kernel for every chunk.
    pid = tl.program_id(0)
    h_tiles = tl.cdiv(H, BLOCK_H)
    dw_tiles = tl.cdiv(width, BLOCK_M) * h_tiles
    if pid < dw_tiles:
        # d weight[v0 + v, hs] = sum_n dlogits[n, v] hidden[n, hs]
        vs = ((pid // h_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        hs = (pid % h_tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
        acc = tl.zeros((BLOCK_M, BLOCK_H), tl.float32)
        for n in range(0, N, BLOCK_K):
            ns = (n + tl.arange(0, BLOCK_K)).to(tl.int64)
            dz = tl.load(dlogits_ptr + ns[None, :] * stride_dn + vs[:, None],
                         mask=(ns[None, :] < N) & (vs[:, None] < width), other=0.0)  # dz.T
            h = tl.load(h_ptr + ns[:, None] * stride_hn + hs[None, :],
                        mask=(ns[:, None] < N) & (hs[None, :] < H), other=0.0)
            acc = _dot(dz, h, acc, PRECISION)
        tl.store(dw_ptr + (v0 + vs[:, None]) * H + hs[None, :], acc.to(dw_ptr.dtype.element_ty),
                 mask=(vs[:, None] < width) & (v0 + vs[:, None] < V) & (hs[None, :] < H))
    else:
        # d hidden[rows, hs] += sum_{v in the chunk} dlogits[rows, v] weight[v0 + v, hs]
        pid -= dw_tiles
        rows = ((pid // h_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        hs = (pid % h_tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
        tile = rows[:, None] * H + hs[None, :]
        in_tile = (rows[:, None] < N) & (hs[None, :] < H)
        if first:
            acc = tl.zeros((BLOCK_M, BLOCK_H), tl.float32)
        else:
            acc = tl.load(dh_acc_ptr + tile, mask=in_tile, other=0.0)
        for v in range(0, width, BLOCK_K):
            vs = (v + tl.arange(0, BLOCK_K)).to(tl.int64)
            dz = tl.load(dlogits_ptr + rows[:, None] * stride_dn + vs[None, :],
                         mask=(rows[:, None] < N) & (vs[None, :] < width), other=0.0)
            w = tl.load(w_ptr + (v0 + vs[:, None]) * stride_wv + hs[None, :],
                        mask=(v0 + vs[:, None] < V) & (hs[None, :] < H), other=0.0)
            acc = _dot(dz, w, acc, PRECISION)
        if last:
            tl.store(dh_ptr + tile, acc.to(dh_ptr.dtype.element_ty), mask=in_tile)
        else:
            tl.store(dh_acc_ptr + tile, acc, mask=in_tile)


def _precision(dtype):
    # tl.dot's input precision for fp32 tiles: what torch uses for an fp32 matmul (see docstring);
    # 16-bit tiles ignore it
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _splits(N, V, device):
    """How many parts the forward cuts the vocabulary into: enough for PROGRAMS_PER_SM programs
    per SM with row blocks of 128, at most one per 128 columns. The interpreter: three, at most
    one per 16 columns, so that the tests' small V has several parts, and sometimes an empty one
    (the last, when there are fewer tiles than splits times tiles per split)."""
    if device.type != "cuda":
        return min(3, triton.cdiv(V, 16))
    programs = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(programs, triton.cdiv(N, 128)), triton.cdiv(V, 128)))


def _chunk(N, V, element_size):
    """Columns per backward chunk: as many as SCRATCH_BYTES of d loss / d logits hold, in
    multiples of CHUNK_MULTIPLE, and no more than V needs."""
    columns = SCRATCH_BYTES // max(1, N * element_size) // CHUNK_MULTIPLE * CHUNK_MULTIPLE
    return min(max(CHUNK_MULTIPLE, columns), triton.cdiv(V, CHUNK_MULTIPLE) * CHUNK_MULTIPLE)


def _flat(hidden, weight, targets):
    """hidden (..., H), weight (V, H), targets (...) -> (N, H), (V, H), (N,), each with unit stride
    along its last dim, as both paths read them."""
    assert hidden.dtype == weight.dtype in (torch.float32, torch.bfloat16, torch.float16), \
        "hidden and weight must have the same float dtype (or run under torch.autocast)"
    H = hidden.shape[-1]
    V = weight.shape[0]
    assert weight.shape == (V, H), "weight must be (V, H), with hidden (..., H)"
    h = hidden.reshape(-1, H)  # (N, H)
    h = h if h.stride(-1) == 1 else h.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    flat_targets = targets.reshape(-1).contiguous()  # (N,)
    assert flat_targets.numel() == h.shape[0], "targets must have hidden's leading shape"
    return h, weight, flat_targets


class _LinearLogprobs(torch.autograd.Function):
    # The fused path: never more than a chunk of the logits (the module's docstring).

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature):
        h, weight, flat_targets = _flat(hidden, weight, targets)
        (N, H), V = h.shape, weight.shape[0]
        inv_temperature = 1.0 / temperature
        splits = _splits(N, V, h.device)
        stats = torch.empty(4, splits, N, device=h.device)  # m, s, w, z_target per split
        if N > 0:
            _fwd_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits)](
                h, weight, flat_targets, stats, N, H, V, h.stride(0), weight.stride(0),
                inv_temperature, PRECISION=_precision(h.dtype))
        # combine the splits, O(splits * N): rescale each to the overall max (a split without
        # columns has m = -inf and s = 0, and counts for nothing)
        m, s, w, z_target = stats
        row_max = m.max(0).values
        scale = torch.exp((m - row_max) * inv_temperature)
        total = (scale * s).sum(0)
        log_sum = total.log()
        w = (scale * torch.where(s > 0, w + (m - row_max) * s, 0.0)).sum(0)
        logprobs = (z_target.sum(0) - row_max) * inv_temperature - log_sum  # (N,)
        entropy = log_sum - inv_temperature * w / total  # (N,)
        ctx.save_for_backward(h, weight, flat_targets, row_max, log_sum, entropy)
        ctx.hidden_shape = hidden.shape
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        # outputs are tensors of their own, so that callers may modify them in place: the saved
        # entropy is a copy
        return logprobs, entropy.clone()

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        h, weight, targets, row_max, log_sum, entropy = ctx.saved_tensors
        N, H = h.shape
        V = weight.shape[0]
        # an output that does not reach the loss contributes nothing: zeros, O(rows)
        grad_logprobs = (torch.zeros_like(log_sum) if grad_logprobs is None
                         else grad_logprobs.reshape(-1).float().contiguous())
        grad_entropy = (torch.zeros_like(log_sum) if grad_entropy is None
                        else grad_entropy.reshape(-1).float().contiguous())
        if N == 0:
            return h.new_zeros(ctx.hidden_shape), torch.zeros_like(weight), None, None
        # the last chunk writes all of grad_hidden; each chunk its rows of grad_weight
        grad_hidden = torch.empty(N, H, dtype=h.dtype, device=h.device)
        grad_weight = torch.empty(V, H, dtype=weight.dtype, device=h.device)
        chunk = _chunk(N, V, h.element_size())
        dlogits = torch.empty(N, chunk, dtype=h.dtype, device=h.device)  # one chunk's d loss / dz
        # d hidden adds up over the chunks in fp32: in its own gradient if that is fp32, else in
        # a scratch accumulator; with one chunk there is nothing to add up, and a one-element
        # stand-in keeps the pointer fp32, so that the kernel compiled for several chunks serves
        grad_hidden_acc = (grad_hidden if h.dtype == torch.float32
                           else torch.empty((N, H) if chunk < V else (1,), device=h.device))
        precision = _precision(h.dtype)
        for v0 in range(0, V, chunk):
            # The chunk's columns, the last chunk's rounded up to 16 (those past V get d loss /
            # dz = 0): Triton then knows every width is a multiple of 16, whatever V is, so one
            # compiled kernel serves every chunk, and the masks along the columns allow wide loads.
            width = min(chunk, triton.cdiv(V - v0, 16) * 16)
            _dlogits_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),
                                          triton.cdiv(width, meta["BLOCK_V"]))](
                h, weight, targets, row_max, log_sum, entropy, grad_logprobs, grad_entropy,
                dlogits, N, H, V, v0, width, h.stride(0), weight.stride(0), dlogits.stride(0),
                1.0 / ctx.temperature, PRECISION=precision)
            _grads_kernel[lambda meta: ((triton.cdiv(width, meta["BLOCK_M"])
                                         + triton.cdiv(N, meta["BLOCK_M"]))
                                        * triton.cdiv(H, meta["BLOCK_H"]),)](
                dlogits, h, weight, grad_weight, grad_hidden_acc, grad_hidden, N, H, V, v0, width,
                h.stride(0), weight.stride(0), dlogits.stride(0), v0 == 0, v0 + chunk >= V,
                PRECISION=precision)
        return grad_hidden.view(ctx.hidden_shape), grad_weight, None, None


def _padded_vocab(V):
    return triton.cdiv(V, VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _padded(weight):
    """weight (V, H) as the first V rows of a (V_pad, H) tensor whose other rows are zeros: a copy,
    unless V is a multiple of VOCAB_MULTIPLE already."""
    V, H = weight.shape
    if V == _padded_vocab(V):
        return weight
    padded = weight.new_zeros(_padded_vocab(V), H)
    padded[:V] = weight
    return padded


class _LogitsLogprobs(torch.autograd.Function):
    # The logits path: the (N, V_pad) logits, in the compute dtype, held from the forward to the
    # backward, which overwrites them with their gradient (a second backward through the same
    # graph would find them modified, and autograd says so).

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature):
        h, weight, flat_targets = _flat(hidden, weight, targets)
        V = weight.shape[0]
        logits = h @ _padded(weight).T  # (N, V_pad)
        logprobs, entropy, row_max, log_sum = forward_rows(logits[:, :V], flat_targets,
                                                           temperature)
        # a copy of the entropy (O(rows)) is saved, so that the caller may modify it in place
        ctx.save_for_backward(h, weight, logits, flat_targets, entropy.clone(), row_max, log_sum)
        ctx.hidden_shape = hidden.shape
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        h, weight, logits, targets, entropy, row_max, log_sum = ctx.saved_tensors
        V = weight.shape[0]
        rows = rows_view(logits[:, :V])  # (1, N, V): read in place, and overwritten
        backward_rows(rows, targets, entropy, row_max, log_sum, grad_logprobs, grad_entropy,
                      ctx.temperature, rows)
        logits[:, V:] = 0  # the padding is in no softmax
        grad_logits = logits  # (N, V_pad): d loss / d logits
        grad_hidden = grad_logits @ _padded(weight)  # (N, H)
        grad_weight = (grad_logits.T @ h)[:V]  # (V, H)
        return grad_hidden.view(ctx.hidden_shape), grad_weight, None, None


def linear_logprobs_ref(hidden, weight, targets, *, temperature=1.0, return_entropy=False):
    """Reference: the logits, (..., V), by F.linear (under autocast in its dtype), then
    token_logprobs_ref."""
    logits = F.linear(hidden, weight)  # (..., V)
    return token_logprobs_ref(logits, targets, temperature=temperature,
                              return_entropy=return_entropy)


def _budget_mib(budget):
    """The logits path's budget in MiB: `budget` if not None, else MINRLHF_LOGITS_BUDGET_MIB, else
    LOGITS_BUDGET_MIB. Read at every call, so that a test (or a run) can change it."""
    given = os.environ.get("MINRLHF_LOGITS_BUDGET_MIB", LOGITS_BUDGET_MIB) if budget is None \
        else budget
    try:
        mib = float(given)
    except (TypeError, ValueError):
        mib = float("nan")
    if not mib >= 0:
        raise ValueError(f"The logits budget (logits_budget_mib, or MINRLHF_LOGITS_BUDGET_MIB) "
                         f"must be a number of MiB, 0 or more, not {given!r}.")
    return mib


def linear_logprobs(hidden, weight, targets, *, temperature=1.0, return_entropy=False,
                    logits_budget_mib=None):
    """log softmax((hidden @ weight.T) / temperature) at `targets`, fp32 with targets' shape; with
    return_entropy=True, the tuple (logprobs, entropy). hidden (..., H), weight (V, H) (the
    lm_head's, or its first V rows), targets (...) in [0, V). Differentiable in hidden and weight.
    The Triton path holds the (N, V) logits, padded to a multiple of 128 columns, where they fit
    in logits_budget_mib (default: MINRLHF_LOGITS_BUDGET_MIB, else 1024), and never more than a
    chunk of them where they do not (the module's docstring says why; a budget of 0 always takes
    the fused path)."""
    if not use_triton(hidden):
        return linear_logprobs_ref(hidden, weight, targets, temperature=temperature,
                                   return_entropy=return_entropy)
    budget = _budget_mib(logits_budget_mib)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # what F.linear would multiply, as autocast casts
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    logits_bytes = targets.numel() * _padded_vocab(weight.shape[0]) * hidden.element_size()
    path = _LogitsLogprobs if 0 < logits_bytes <= budget * 2**20 else _LinearLogprobs
    logprobs, entropy = path.apply(hidden, weight, targets, float(temperature))
    logprobs, entropy = logprobs.view(targets.shape), entropy.view(targets.shape)
    return (logprobs, entropy) if return_entropy else logprobs
