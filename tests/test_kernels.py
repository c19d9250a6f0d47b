"""Tests for kernels/: each Triton kernel against its PyTorch reference, and both against an fp64
computation, forward and backward. Without a GPU the kernels run on CPU tensors through
TRITON_INTERPRET=1 (set in conftest.py), which is slow: shapes stay tiny except a few rows at
V = 50257, the GPT-2 vocabulary, which is not a multiple of the kernels' 4096-wide blocks. The
kernels run one program per row, so the odd sizes that matter are V (and T for GAE, whose blocks
are up to 1024 steps): V = 1, 7, 4099, 50257 and T = 1, 37, 1500.

Tolerances. Forward outputs are fp32 computed in fp32 from the same (rounded) inputs as the fp64
truth, whatever the input dtype, so they must agree to fp32 accuracy: rtol = atol = 1e-5. fp32's
unit roundoff is 6e-8; a log-sum-exp over 50257 terms of logits up to ~30 loses a few 1e-6, while
a wrong rescale, a dropped chunk or a bf16 intermediate is off by 1e-3 or more. Gradients are
stored in the logits' dtype, rounded once: allowed one unit in the last place of that dtype
(2**-7 relative for bf16, 2**-10 for fp16, 1e-5 for fp32), plus 1e-5 absolute: the reference's
log_softmax backward sums V products in fp32 and is off by ~1e-5 at V = 50257 (the kernels by
~1e-6), while a wrong sign, temperature factor or normaliser is off by the gradient itself.
GAE and ppo_advantages sum up to T terms that can cancel, so each output is held to an error bound
derived from its terms (above gae_fp64), not to a fixed tolerance.
"""

import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

# Every test here runs a Triton kernel (in the interpreter without a GPU). Where Triton does not
# install (macOS), tests/test_no_triton.py checks what runs instead.
pytest.importorskip("triton", reason="Triton is not installed (no wheel for this platform)")

import kernels  # noqa: E402
from kernels import (gae, gae_ref, kl_full, kl_full_ref, ppo_advantages,  # noqa: E402
                     ppo_advantages_ref, token_logprobs, token_logprobs_ref)
from kernels.gae import gae_doubling_ref  # noqa: E402

# kernels.gae and kernels.linear_logprobs are the functions; these are their modules
gae_module = importlib.import_module("kernels.gae")
linear_module = importlib.import_module("kernels.linear_logprobs")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FWD_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}
# (leading shape, V): V = 1; V not a power of two, in 1-D and 3-D; V = 50257, several chunks
SHAPES = [((4,), 1), ((3,), 7), ((2, 3), 7), ((3,), 50257)]
over_dtypes_and_temperatures = pytest.mark.parametrize(
    "dtype,temperature", [(dtype, t) for dtype in DTYPES for t in (1.0, 0.7)])
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Under the interpreter a NaN or inf made in a kernel's masked-off lanes shows up as a numpy
# RuntimeWarning; on a GPU it would be silent until it leaked through a tl.where.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    # the public functions run the Triton kernels, whatever the device; the *_ref are called
    # directly for the PyTorch side
    monkeypatch.setenv("MINRLHF_KERNELS", "triton")


# ---- fp64 truths, written independently of kernels/ ----------------------------------------

def logprobs_fp64(logits, targets, temperature):
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return logp.gather(-1, targets[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


def kl_fp64(logits, ref_logits, temperature):
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    ref_logp = torch.log_softmax(ref_logits.double() / temperature, dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


# GAE's error bound, from which its tolerances come. With u = 2**-24 (fp32's unit roundoff),
# c = gamma * lam, and fp32 inputs (exact in fp64), the truth is
#     A_t = sum_{k < n} c^k delta_{t+k},   delta_t = r_t + gamma V_{t+1} - V_t,   R_t = A_t + V_t
# over the n valid steps from t on. It can cancel to near 0 while its terms are large, so the error
# of an fp32 evaluation is bounded by the terms, not by the result. Any order of evaluation (the
# loop of gae_ref, the kernel's scan in chunks with a carry between them, the doubling of
# gae_doubling_ref) reaches A_t from term k through, to first order in u:
#   - c^k: fp32's c = fl(fl(gamma) fl(lam)) is off by <= 3u relatively, so c^k by <= 3k u, and c^k
#     is formed (as a running product, a scan's decay products, or by squaring) with <= k more
#     roundings of u each: <= 4k u;
#   - the multiply-and-adds on its path to A_t, 2 roundings each: k + 1 in the loop, log2(T) in the
#     doubling; in the kernel, one per level of Triton's scan in a chunk (a thread's own steps in
#     sequence, at most 16 with these configs, then trees over a warp's 32 lanes and over at most
#     16 warps, then the apply: <= 40) plus one carry per chunk crossed (<= k / 16 + 1, chunks
#     being >= 16 steps). In all <= 3k + 4 log2(T) + 80 roundings, whatever the scheme;
#   - delta_t's own 3 operations: <= 4u D_t, D_t = |r_t| + |gamma V_{t+1}| + |V_t|, plus the error
#     of r_t where the kernel computes it (ppo_advantages: reward_error below).
# Hence, term by term,
#     |A - A_t| <= sum_k c^k (u [(7k + 4 log2 T + 80) |delta_{t+k}| + 4 D_{t+k}] + reward_error)
#     |R - R_t| <= that + u (|A_t| + |V_t|),
# which gae_fp64 accumulates backwards beside A_t (sum k c^k x_{t+k} = c (that sum at t + 1 +
# sum c^k x_{t+1+k})). At T = 1500, c = 0.99 it is ~5e-3 where the terms are ~1 (the scan was
# 1.3e-5 off on an H100, over a fixed atol of 1e-5), while a dropped chunk carry is off by
# c^(steps to the chunk's end) |A| ~ 1 and a wrong decay by more: test_gae_tolerance_can_fail.
U = 2.0 ** -24


def gae_fp64(rewards, values, lengths, gamma, lam, reward_error=None):
    """Advantages and returns straight from the paper, one row at a time over its valid tokens
    only, in fp64; and the bound above for each (0 where masked: the outputs must be exactly 0)."""
    B, T = rewards.shape
    c = gamma * lam
    roundings = 4 * max(1, math.ceil(math.log2(T))) + 80
    reward_error = torch.zeros(B, T) if reward_error is None else reward_error
    out = torch.zeros(4, B, T, dtype=torch.float64)  # advantages, returns, their bounds
    for b, (r, v, err, n) in enumerate(zip(rewards.tolist(), values.tolist(),
                                           reward_error.tolist(), lengths.tolist())):
        next_value, next_advantage = 0.0, 0.0
        terms = weighted = rest = 0.0  # sums of c^k |delta|, of k c^k |delta|, of the rest
        for t in reversed(range(n)):
            delta = r[t] + gamma * next_value - v[t]
            next_advantage = delta + c * next_advantage
            weighted = c * (weighted + terms)
            terms = abs(delta) + c * terms
            rest = U * 4 * (abs(r[t]) + abs(gamma * next_value) + abs(v[t])) + err[t] + c * rest
            bound = U * (7 * weighted + roundings * terms) + rest
            out[:, b, t] = torch.tensor([next_advantage, next_advantage + v[t], bound,
                                         bound + U * (abs(next_advantage) + abs(v[t]))])
            next_value = v[t]
    return out.unbind()


def assert_within(actual, expected, bound):
    """|actual - expected| <= bound elementwise (a bound of 0: exactly equal)."""
    error = (actual.cpu().double() - expected).abs()
    worst = (error - bound).argmax()
    assert (error <= bound).all(), (f"off by {error.flatten()[worst]:.3g} at "
                                    f"{[int(i) for i in torch.unravel_index(worst, error.shape)]}"
                                    f", allowed {bound.flatten()[worst]:.3g}")


# ---- helpers -------------------------------------------------------------------------------

def random_logits(lead, V, dtype, scale=4.0):
    return (torch.randn(*lead, V, device=DEVICE) * scale).to(dtype)


def extreme_logits(V, dtype):
    # rows: one 1e4 among -1e4; all equal; all 1e4; alternating +-1e4 (ties at the max)
    rows = torch.full((4, V), -1e4)
    rows[0, V // 2] = 1e4
    rows[1] = 0.0
    rows[2] = 1e4
    rows[3, ::2] = 1e4
    return rows.to(DEVICE, dtype)


def assert_grad_close(grad, grad64, dtype):
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), grad64, rtol=GRAD_RTOL[dtype], atol=1e-5)


def check_token_logprobs(logits, targets, temperature):
    """Forward and backward of token_logprobs (Triton) and the reference against fp64."""
    dtype = logits.dtype
    lp64, h64 = logprobs_fp64(logits, targets, temperature)
    w_lp, w_h = torch.randn(2, *targets.shape, device=DEVICE, dtype=torch.float64)
    logits64 = logits.detach().double().requires_grad_()
    lp, h = logprobs_fp64(logits64, targets, temperature)
    grad64, = torch.autograd.grad((lp * w_lp + h * w_h).sum(), logits64)
    for fn in (token_logprobs, token_logprobs_ref):
        x = logits.detach().requires_grad_()
        lp, h = fn(x, targets, temperature=temperature, return_entropy=True)
        assert lp.dtype == h.dtype == torch.float32 and lp.shape == h.shape == targets.shape
        torch.testing.assert_close(lp.double(), lp64, **FWD_TOL)
        torch.testing.assert_close(h.double(), h64, **FWD_TOL)
        grad, = torch.autograd.grad((lp * w_lp + h * w_h).sum(), x)
        assert_grad_close(grad, grad64, dtype)


def check_kl_full(logits, ref_logits, temperature, fns=(kl_full, kl_full_ref)):
    kl64 = kl_fp64(logits, ref_logits, temperature)
    w = torch.randn(logits.shape[:-1], device=DEVICE, dtype=torch.float64)
    logits64 = logits.detach().double().requires_grad_()
    grad64, = torch.autograd.grad((kl_fp64(logits64, ref_logits, temperature) * w).sum(), logits64)
    for fn in fns:
        x = logits.detach().requires_grad_()
        kl = fn(x, ref_logits, temperature=temperature)
        assert kl.dtype == torch.float32 and kl.shape == logits.shape[:-1]
        torch.testing.assert_close(kl.double(), kl64, **FWD_TOL)
        grad, = torch.autograd.grad((kl * w).sum(), x)
        assert_grad_close(grad, grad64, logits.dtype)


class NewTensors(TorchDispatchMode):
    """Records the shape and dtype of every tensor an op returns in new memory (not a view)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        self.made += [(t.numel(), t.dtype) for t in tree_leaves(out) if isinstance(t, torch.Tensor)
                      and t.untyped_storage().data_ptr() not in inputs]
        return out


def force_config(monkeypatch, module, config):
    """Every kernel of `module` launches with `config` (a dict of block sizes, and num_warps and
    num_stages, which only a GPU reads): in the interpreter and on a GPU alike."""
    launched = [k for k in vars(module).values() if hasattr(k, "gpu_config")]
    assert launched, f"no kernel with a launch config in {module.__name__}"
    for kernel in launched:
        monkeypatch.setattr(kernel, "gpu_config", lambda args: config)
        monkeypatch.setattr(kernel, "interpret_config", lambda args: config)


def configs_to_run(configs, block):
    """The configs that MINRLHF_AUTOTUNE=1 chooses among: all of them on a GPU; in the
    interpreter, which ignores warps and stages, one per value of `block`."""
    if torch.cuda.is_available():
        return configs
    return sorted({c.kwargs[block]: c for c in configs}.values(), key=lambda c: c.kwargs[block])


def warm_up(fn, *args):
    """One forward and backward of fn(*args), so that on a GPU autotuning, which times the kernels
    with buffers of its own, is done before a test records allocations or peak memory."""
    out = fn(*args)
    loss = sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()
    torch.autograd.grad(loss, [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad])


def big_tensors_of_backward(loss, logits):
    """(numel, dtype) of each tensor of the logits' size or more that the backward creates."""
    with NewTensors() as record:
        torch.autograd.grad(loss, logits)
    return [(n, dtype) for n, dtype in record.made if n >= logits.numel()]


# ---- dispatch --------------------------------------------------------------------------------

def test_dispatch_follows_env_and_device(monkeypatch):
    # right with and without a GPU: DEVICE is where the kernels run in this session
    x = torch.randn(3, 5, device=DEVICE)
    assert kernels._common.use_triton(x)  # MINRLHF_KERNELS=triton from the fixture
    monkeypatch.setenv("MINRLHF_KERNELS", "torch")
    assert not kernels._common.use_triton(x)
    monkeypatch.delenv("MINRLHF_KERNELS")
    assert kernels._common.use_triton(x) == x.is_cuda
    assert not kernels._common.use_triton(x.cpu())  # CPU tensors get the reference
    monkeypatch.setenv("MINRLHF_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MINRLHF_KERNELS"):
        kernels._common.use_triton(x)
    # Triton forced on CPU tensors without the interpreter: one clear sentence (on a GPU machine
    # TRITON_INTERPRET is not set in the first place)
    monkeypatch.setenv("MINRLHF_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels._common.use_triton(x.cpu())


def test_rows_view_reads_sliced_logits_in_place():
    full = torch.randn(2, 6, 7)
    rows = kernels._common.rows_view(full[:, 1:-1])  # as PPO slices the response's logits
    assert rows.shape == (2, 4, 7) and rows.data_ptr() == full[:, 1:].data_ptr()
    assert kernels._common.rows_view(full[0, 0]).shape == (1, 1, 7)
    # a gradient in the same layout would be mostly gap here: the rows are copied, both dense
    rows, grad = kernels._common.rows_and_grad(torch.randn(4, 2**17)[:, :5])
    assert rows.is_contiguous() and grad.is_contiguous() and grad.shape == (1, 4, 5)


def laid_out(lead, V, dtype, layout):
    """Random logits (*lead, V) in one of the layouts the kernels read in place."""
    if layout == "contiguous":
        return random_logits(lead, V, dtype)
    if layout == "padded":  # full[..., :V] of a vocabulary padded to a multiple of 128 (the model)
        return random_logits(lead, -(-V // 128) * 128, dtype)[..., :V]
    if layout == "shifted":  # rows that start 3 elements past a 16-byte boundary, stride V + 5
        return random_logits(lead, V + 5, dtype)[..., 3:3 + V]
    assert layout == "sliced"  # logits[:, :-1] as PPO takes them
    return random_logits((lead[0], lead[1] + 1, *lead[2:]), V, dtype)[:, :-1]


LAYOUTS = ["contiguous", "padded", "shifted", "sliced"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_args_claim_only_aligned_blocks(dtype, layout):
    # The kernels tell the compiler (tl.multiple_of) that each whole block starts 16 bytes aligned,
    # which the interpreter cannot check: a false claim would be a misaligned vector load on the
    # GPU. Check every row's claim on the addresses, and that a gradient allocated by
    # empty_rows_like is cut into the same blocks.
    rows = kernels._common.rows_view(laid_out((3, 5), 37, dtype, layout))
    base, offset, stride_b, stride_t, align = kernels._common.row_args(rows)
    assert base.data_ptr() % 16 == 0 and align == 16 // rows.element_size()
    size = rows.element_size()
    for b in range(rows.shape[0]):
        for t in range(rows.shape[1]):
            start = offset + b * stride_b + t * stride_t  # row_start
            assert base.data_ptr() + start * size == rows[b, t].data_ptr()
            head = (align - start % align) % align  # row_blocks
            assert (base.data_ptr() + (start + head) * size) % 16 == 0 and head < align
    same, grad = kernels._common.rows_and_grad(rows)
    assert same.data_ptr() == rows.data_ptr() and same.stride() == rows.stride()  # not copied
    assert grad.shape == rows.shape and grad.stride() == rows.stride()
    assert kernels._common.row_args(grad)[1:] == (offset, stride_b, stride_t, align)


def test_kl_full_claims_reference_alignment_only_when_true():
    full = random_logits((2, 3), 40, torch.bfloat16)
    for ref, aligned in ((full[..., :37], True), (random_logits((2, 3), 37, torch.bfloat16), False),
                         (full[..., 3:40], False), (full[..., 8:], True),
                         (full[..., :37].float(), False)):
        flags = kernels.kl._launch_args(*map(kernels._common.rows_view, (full[..., :37], ref)))[2]
        assert flags["REF_ALIGNED"] == aligned


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("V", [15, 16, 17, 40])
def test_rows_in_every_layout_and_around_a_block(monkeypatch, V, layout):
    # Blocks of 16 columns: V below, at and just past one block, and two whole blocks with a head
    # and a tail; the layouts the model passes (rows in a padded buffer, sliced rows, rows whose
    # start is not aligned, so that they begin with a head). One dtype each, by turns; the
    # reference logits of kl_full in the next layout, so that its blocks are sometimes aligned
    # with the policy's and sometimes not.
    for module in (kernels.logprobs, kernels.kl):
        monkeypatch.setattr(module, "INTERPRET_BLOCK_V", 16)
    i = LAYOUTS.index(layout)
    dtype = DTYPES[(V + i) % len(DTYPES)]
    torch.manual_seed(V + i)
    logits = laid_out((2, 3), V, dtype, layout)
    targets = torch.randint(0, V, (2, 3), device=DEVICE)
    check_token_logprobs(logits, targets, 0.7)
    check_kl_full(logits, laid_out((2, 3), V, dtype, LAYOUTS[(i + 1) % len(LAYOUTS)]), 0.7)
    # the gradient comes back in the logits' own layout: same strides, so the same blocks
    x = logits.detach().requires_grad_()
    grad, = torch.autograd.grad(token_logprobs(x, targets).sum(), x)
    assert grad.stride() == logits.stride()


@pytest.mark.parametrize("config", configs_to_run(kernels.logprobs.CONFIGS, "BLOCK_V"), ids=str)
def test_every_gpu_block_size(monkeypatch, config):
    # MINRLHF_AUTOTUNE=1 picks among these configs; each runs here once (in the interpreter, each
    # block size), on rows with a head, two whole blocks and a tail
    for module in (kernels.logprobs, kernels.kl):
        force_config(monkeypatch, module, config.all_kwargs())
    V = 2 * config.kwargs["BLOCK_V"] + 21
    torch.manual_seed(0)
    logits = laid_out((2,), V, torch.bfloat16, "shifted")
    check_token_logprobs(logits, torch.randint(0, V, (2,), device=DEVICE), 0.7)
    check_kl_full(logits, laid_out((2,), V, torch.bfloat16, "shifted"), 0.7, fns=(kl_full,))


def test_shift_invariant():
    # The kernels take differences of logits, z - max z, in the logits' own units and scale them by
    # 1/T only after (logprobs.py says why). Adding 4096 to every logit, exact in fp32 for these
    # quarter-integers, must then give the same bits forward and backward. A kernel that computes
    # z / T first rounds it at 4096 / 0.7 ~ 5851, where fp32 values are 5e-4 apart: the version
    # that did fails this by ~1e-4 even in the interpreter; on an H100, where the rounding of a
    # division differed between uses, it failed the extreme-logit gradients at T = 0.7.
    torch.manual_seed(0)
    logits = torch.randint(-40, 40, (3, 4, 37), device=DEVICE).float() / 4
    ref_logits = torch.randint(-40, 40, (3, 4, 37), device=DEVICE).float() / 4
    targets = torch.randint(0, 37, (3, 4), device=DEVICE)
    w = torch.randn(3, 3, 4, device=DEVICE)
    outputs = []
    for shift in (0.0, 4096.0):
        x = (logits + shift).requires_grad_()
        lp, h = token_logprobs(x, targets, temperature=0.7, return_entropy=True)
        kl = kl_full(x, ref_logits - shift, temperature=0.7)
        grads = torch.autograd.grad((lp * w[0] + h * w[1] + kl * w[2]).sum(), x)
        outputs.append((lp, h, kl, *grads))
    for unshifted, shifted in zip(*outputs):
        assert torch.equal(unshifted, shifted)


# ---- token_logprobs --------------------------------------------------------------------------

@over_dtypes_and_temperatures
@pytest.mark.parametrize("lead,V", SHAPES)
def test_token_logprobs(lead, V, dtype, temperature):
    torch.manual_seed(0)
    logits = random_logits(lead, V, dtype)
    targets = torch.randint(0, V, lead, device=DEVICE)
    check_token_logprobs(logits, targets, temperature)


@over_dtypes_and_temperatures
@pytest.mark.parametrize("V", [7, 4099])
def test_token_logprobs_extreme_logits(V, dtype, temperature):
    logits = extreme_logits(V, dtype)
    targets = torch.tensor([V // 2, 0, V - 1, 1], device=DEVICE)  # at the max and away from it
    check_token_logprobs(logits, targets, temperature)


def test_token_logprobs_one_output_in_the_loss():
    # the unused output's gradient reaches backward as None and must count as zero
    torch.manual_seed(0)
    logits = random_logits((5,), 33, torch.float32).requires_grad_()
    targets = torch.randint(0, 33, (5,), device=DEVICE)
    lp64, h64 = logprobs_fp64(logits, targets, 1.0)
    for out64, pick in ((lp64, lambda lp, h: lp), (h64, lambda lp, h: h)):
        grad, = torch.autograd.grad(pick(*token_logprobs(logits, targets, return_entropy=True))
                                    .sum(), logits)
        logits64 = logits.detach().double().requires_grad_()
        grad64, = torch.autograd.grad(pick(*logprobs_fp64(logits64, targets, 1.0)).sum(),
                                      logits64)
        assert_grad_close(grad, grad64, torch.float32)
    lp = token_logprobs(logits, targets)  # return_entropy=False: a tensor, not a tuple
    torch.testing.assert_close(lp.double(), lp64, **FWD_TOL)


def test_token_logprobs_sliced_logits():
    # logits[:, :-1] as PPO takes them: the kernels read the strided rows without a copy
    torch.manual_seed(0)
    full = random_logits((2, 6), 7, torch.bfloat16)
    logits = full[:, 1:-1]
    targets = torch.randint(0, 7, (2, 4), device=DEVICE)
    check_token_logprobs(logits, targets, 0.7)


def test_token_logprobs_backward_makes_no_fp32_logits():
    # The backward may create one tensor of the logits' size, the gradient in their dtype, and
    # the forward may save nothing of that size but the logits themselves. The reference, which
    # upcasts, fails both checks: the checks can fail.
    logits = random_logits((2, 3), 11, torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 11, (2, 3), device=DEVICE)
    warm_up(token_logprobs, logits, targets)
    for fn, ok in ((token_logprobs, True), (token_logprobs_ref, False)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            lp, h = fn(logits, targets, return_entropy=True)
        saves_rows_only = all(t.data_ptr() == logits.data_ptr() or t.numel() <= 6 for t in saved)
        big = big_tensors_of_backward((lp + h).sum(), logits)
        assert saves_rows_only == ok
        assert (big == [(logits.numel(), torch.bfloat16)]) == ok


def test_outputs_can_be_modified_in_place():
    # ppo.py may mask or whiten what these return in place: outputs are not views, and what the
    # backward needs is not an output
    logits = random_logits((2, 3), 11, torch.float32).requires_grad_()
    targets = torch.randint(0, 11, (2, 3), device=DEVICE)
    lp, h = token_logprobs(logits, targets, return_entropy=True)
    kl = kl_full(logits, random_logits((2, 3), 11, torch.float32))
    lp[:, -1] = 0.0
    h.mul_(2)
    kl.mul_(2)
    torch.autograd.grad((lp + h + kl).sum(), logits)
    x = torch.randn(2, 3, device=DEVICE)
    for out in (*gae(x, x, x > 0, gamma=1.0, lam=0.95),
                *ppo_advantages(x[:, 0], x, x, x, x > 0, kl_coef=0.1, gamma=1.0, lam=0.95)):
        out[0, 0] = 1.0


# ---- kl_full ---------------------------------------------------------------------------------

@over_dtypes_and_temperatures
@pytest.mark.parametrize("lead,V", SHAPES)
def test_kl_full(lead, V, dtype, temperature):
    torch.manual_seed(0)
    logits = random_logits(lead, V, dtype)
    ref_logits = (logits.float() + random_logits(lead, V, torch.float32, scale=1.0)).to(dtype)
    check_kl_full(logits, ref_logits, temperature)


@over_dtypes_and_temperatures
@pytest.mark.parametrize("V", [7, 4099])
def test_kl_full_extreme_logits(V, dtype, temperature):
    logits = extreme_logits(V, dtype)
    check_kl_full(logits, logits, temperature)  # KL = 0 exactly
    # KL up to 2e4 / T nats. The reference's fp32 log_softmax backward sums V terms of that size
    # and loses ~5e-5 in the gradient here; the kernel, working relative to the row maxima,
    # keeps to the usual tolerance, so only the kernel is held to it.
    check_kl_full(logits, logits.roll(1, dims=0), temperature, fns=(kl_full,))


def test_kl_full_sliced_logits_and_no_gradient_to_the_reference():
    torch.manual_seed(0)
    full = random_logits((2, 6), 7, torch.float16)
    ref_logits = random_logits((2, 4), 7, torch.float16).requires_grad_()
    check_kl_full(full[:, 1:-1], ref_logits, 1.0)
    kl = kl_full(full[:, 1:-1].requires_grad_(), ref_logits)
    assert torch.autograd.grad(kl.sum(), ref_logits, allow_unused=True) == (None,)


def test_kl_full_backward_makes_no_fp32_logits():
    logits = random_logits((2, 3), 11, torch.bfloat16).requires_grad_()
    ref_logits = random_logits((2, 3), 11, torch.bfloat16)
    warm_up(kl_full, logits, ref_logits)
    for fn, ok in ((kl_full, True), (kl_full_ref, False)):
        big = big_tensors_of_backward(fn(logits, ref_logits).sum(), logits)
        assert (big == [(logits.numel(), torch.bfloat16)]) == ok


@gpu_only
@pytest.mark.parametrize("op", ["token_logprobs", "kl_full"])
def test_backward_peak_memory_on_gpu(op):
    # on the device: what the backward allocates at its peak is the gradient and O(rows) more
    N, V = 256, 50257
    logits = random_logits((N,), V, torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEVICE)
    ref_logits = random_logits((N,), V, torch.bfloat16)
    args = (logits, targets) if op == "token_logprobs" else (logits, ref_logits)
    fn = {"token_logprobs": lambda *a: token_logprobs(*a, return_entropy=True),
          "kl_full": kl_full}[op]
    warm_up(fn, *args)
    out = fn(*args)
    loss = sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grad, = torch.autograd.grad(loss, logits)
    torch.cuda.synchronize()
    grad_bytes = grad.numel() * grad.element_size()
    assert torch.cuda.max_memory_allocated() - before <= grad_bytes + 2**20


# ---- linear_logprobs -------------------------------------------------------------------------

# Its tolerances, from a bound like GAE's (u is fp32's unit roundoff, u_c the compute dtype's):
#   - the fp32 logits sum H exact products, so they are off by <= Delta = H u sum_k |h_k w_k| (per
#     row, the max over the vocabulary): the log-prob by <= 2 Delta / T and the entropy by
#     <= (2 |entropy| + 2) Delta / T, beyond the fp32 softmax's own 1e-5 (FWD_TOL);
#   - p is then off relatively by <= eps = 3 Delta / T + (V + 16) u (the logits, a sum of V
#     exponentials, an exp, a log), so d loss / d logits by <= (|g_lp| + |g_h| (|log p + H| + 2))
#     p eps / T, before its one rounding to the compute dtype (u_c relatively: the unfused path
#     rounds the gradient of its bf16 logits the same way);
#   - d hidden = dlogits @ weight carries those errors times |weight|, V u of fp32 accumulation,
#     and a rounding to hidden's dtype (u_c); d weight the same with hidden and N.
# The logits path (logits that fit in the budget: one matmul, then token_logprobs) rounds the
# logits to the compute dtype, as the model's unfused path does: Delta grows by u_c |z| there
# (for 16-bit inputs), and every bound after it with it.
# A missing temperature factor, a transposed operand or a dropped chunk is off by the gradient
# itself, far beyond these.
# u_c for bf16 is a whole unit in the last place: the interpreter rounds fp32 to bf16 towards zero
# (a GPU to nearest, half that).
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-11}


# the budgets that make linear_logprobs take either path, at the tests' sizes
PATHS = {"fused": 0, "logits": 2**20}


def check_linear_logprobs(hidden, weight, targets, temperature, autocast_dtype=None, pad=3,
                          path="fused"):
    """linear_logprobs (Triton), forward and both gradients, against fp64 within the bounds above,
    through the fused path or the logits path. The weight goes in as the first V rows of a
    (V + pad, H) leaf, as the model passes its padded lm_head. With autocast_dtype, the inputs go
    in under torch.autocast and the truth is computed from them rounded to that dtype."""
    dtype = autocast_dtype or hidden.dtype
    u_c = UNIT_ROUNDOFF[dtype]
    H, V = hidden.shape[-1], weight.shape[0]
    # the truth, from the inputs as the kernel multiplies them
    h64 = hidden.detach().to(dtype).double().requires_grad_()
    w64 = weight.detach().to(dtype).double().requires_grad_()
    logits64 = h64 @ w64.T
    logits64.retain_grad()
    lp64, ent64 = logprobs_fp64(logits64, targets, temperature)
    w_lp, w_h = torch.randn(2, *targets.shape, device=DEVICE, dtype=torch.float64)
    (lp64 * w_lp + ent64 * w_h).sum().backward()
    lp64, ent64 = lp64.detach(), ent64.detach()
    # the bounds
    logp = torch.log_softmax(logits64.detach() / temperature, -1)
    delta = H * U * (h64.detach().abs() @ w64.detach().abs().T).amax(-1)  # (...)
    if path == "logits" and dtype != torch.float32:
        delta = delta + u_c * logits64.detach().abs().amax(-1)
    eps = 3 * delta / temperature + (V + 16) * U
    gains = w_lp.abs()[..., None] + w_h.abs()[..., None] * (2 + (logp + ent64[..., None]).abs())
    dlogits_error = (gains * logp.exp() * eps[..., None] / temperature
                     + u_c * logits64.grad.abs()).reshape(-1, V)
    dlogits_size = logits64.grad.abs().reshape(-1, V)
    abs_h, abs_w = h64.detach().abs().reshape(-1, H), w64.detach().abs()
    grad_h_bound = ((dlogits_error @ abs_w + V * U * (dlogits_size @ abs_w)).view(hidden.shape)
                    + u_c * h64.grad.abs())
    grad_w_bound = (dlogits_error.T @ abs_h + len(abs_h) * U * (dlogits_size.T @ abs_h)
                    + u_c * w64.grad.abs())
    # the kernel
    x = hidden.detach().requires_grad_()
    w_full = torch.cat([weight.detach(), torch.randn(pad, H, device=DEVICE).to(weight.dtype)])
    w_full.requires_grad_()
    with torch.autocast(DEVICE, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        lp, ent = kernels.linear_logprobs(x, w_full[:V], targets, temperature=temperature,
                                          return_entropy=True, logits_budget_mib=PATHS[path])
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == targets.shape
    assert_within(lp, lp64, 1e-5 + 1e-5 * lp64.abs() + 2 * delta / temperature)
    assert_within(ent, ent64,
                  1e-5 + 1e-5 * ent64.abs() + (2 * ent64.abs() + 2) * delta / temperature)
    grad_h, grad_w = torch.autograd.grad((lp * w_lp + ent * w_h).sum(), (x, w_full))
    assert grad_h.dtype == hidden.dtype and grad_w.dtype == weight.dtype
    assert_within(grad_h, h64.grad, grad_h_bound)
    assert_within(grad_w[:V], w64.grad, grad_w_bound)
    assert not grad_w[V:].any()  # the pad rows are in no softmax


def linear_inputs(lead, H, V, dtype):
    hidden = torch.randn(*lead, H, device=DEVICE).to(dtype)
    weight = (torch.randn(V, H, device=DEVICE) * 0.3).to(dtype)
    return hidden, weight, torch.randint(0, V, lead, device=DEVICE)


@pytest.mark.parametrize("path", PATHS)
@over_dtypes_and_temperatures
def test_linear_logprobs(dtype, temperature, path):
    # N, H and V not multiples of the interpreter's 16-wide tiles; V over three vocabulary splits
    torch.manual_seed(0)
    check_linear_logprobs(*linear_inputs((21,), 24, 67, dtype), temperature, path=path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("lead,H,V", [((3, 4), 17, 1), ((1,), 8, 5), ((2, 3, 5), 40, 50)])
def test_linear_logprobs_shapes(lead, H, V, path):
    # V = 1 (log-prob and entropy 0, no gradient); one row; hidden (..., H) with three leading
    # dims, and V = 50 in four tiles over three splits of two tiles: the third split is empty
    torch.manual_seed(0)
    check_linear_logprobs(*linear_inputs(lead, H, V, torch.bfloat16), 0.7, path=path)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_logprobs_in_chunks(monkeypatch, dtype):
    # backward chunks of 32 columns, five of them: d hidden adds up over the chunks, in an fp32
    # accumulator for 16-bit hidden states, in the gradient itself for fp32 ones
    monkeypatch.setattr(linear_module, "CHUNK_MULTIPLE", 16)
    monkeypatch.setattr(linear_module, "SCRATCH_BYTES", 21 * 32 * dtype.itemsize)
    torch.manual_seed(0)
    check_linear_logprobs(*linear_inputs((21,), 24, 131, dtype), 0.7)


@pytest.mark.parametrize("path", PATHS)
def test_linear_logprobs_under_autocast(path):
    # the model's call: fp32 hidden states (LayerNorm output) and an fp32 weight under bf16
    # autocast, multiplied in bf16 as F.linear would, their gradients fp32
    torch.manual_seed(0)
    check_linear_logprobs(*linear_inputs((21,), 24, 67, torch.float32), 0.7,
                          autocast_dtype=torch.bfloat16, path=path)


def linear_outputs(hidden, weight, targets, fn, **kwargs):
    """Log-probs, entropy and both gradients (of a fixed random mix of the two) of fn."""
    x, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    lp, ent = fn(x, w, targets, temperature=0.7, return_entropy=True, **kwargs)
    mix = torch.randn(2, *targets.shape, device=DEVICE,
                      generator=torch.Generator(DEVICE).manual_seed(1))
    return (lp, ent, *torch.autograd.grad((lp * mix[0] + ent * mix[1]).sum(), (x, w)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_logprobs_paths_agree(dtype):
    # fp32: the two paths compute the same thing in fp32, so they agree to fp32 accuracy. Any
    # dtype: the logits path is the model's unfused path (the logits in the input dtype, then
    # token_logprobs), whose gradients it rounds the same way: to within one unit in the last
    # place, the matmuls summing in another order.
    torch.manual_seed(0)
    hidden, weight, targets = linear_inputs((21,), 24, 67, dtype)
    logits_path = linear_outputs(hidden, weight, targets, kernels.linear_logprobs,
                                 logits_budget_mib=PATHS["logits"])
    unfused = linear_outputs(hidden, weight, targets, lambda h, w, t, **kw: token_logprobs(
        torch.nn.functional.linear(h, w), t, **kw))
    others = [unfused]
    if dtype == torch.float32:
        others.append(linear_outputs(hidden, weight, targets, kernels.linear_logprobs,
                                     logits_budget_mib=PATHS["fused"]))
    for other in others:
        for a, b in zip(logits_path[:2], other[:2]):
            torch.testing.assert_close(a, b, **FWD_TOL)
        for a, b in zip(logits_path[2:], other[2:]):
            torch.testing.assert_close(a, b, rtol=GRAD_RTOL[dtype], atol=1e-5)


@pytest.mark.parametrize("tiles", range(len(linear_module.FWD_CONFIGS)))
def test_linear_logprobs_every_gpu_tile(monkeypatch, tiles):
    # MINRLHF_AUTOTUNE=1 picks among these tiles; each runs here once, in the interpreter or on
    # the GPU
    fwd, grad = linear_module.FWD_CONFIGS[tiles], linear_module.GRAD_CONFIGS[tiles]
    force_config(monkeypatch, linear_module, {**fwd.all_kwargs(), **grad.kwargs})
    torch.manual_seed(0)
    check_linear_logprobs(*linear_inputs((21,), 72, 67, torch.bfloat16), 0.7)


def test_linear_logprobs_holds_no_logits(monkeypatch):
    # The fused path: forward and backward create no tensor of N * V elements or more (N = 20,
    # V = 300; the weight and its gradient are 300 * 16): the backward's chunk is 64 columns
    # here. The reference, which makes the logits, fails the check: it can fail.
    monkeypatch.setattr(linear_module, "CHUNK_MULTIPLE", 16)
    monkeypatch.setattr(linear_module, "SCRATCH_BYTES", 20 * 64 * 2)
    monkeypatch.setenv("MINRLHF_LOGITS_BUDGET_MIB", "0")
    torch.manual_seed(0)
    hidden, weight, targets = linear_inputs((20,), 16, 300, torch.bfloat16)
    hidden.requires_grad_()
    weight.requires_grad_()
    warm_up(kernels.linear_logprobs, hidden, weight, targets)
    for fn, ok in ((kernels.linear_logprobs, True), (kernels.linear_logprobs_ref, False)):
        with NewTensors() as record:
            lp, ent = fn(hidden, weight, targets, temperature=0.7, return_entropy=True)
            torch.autograd.grad((lp + ent).sum(), (hidden, weight))
        assert (max(n for n, _ in record.made) < 20 * 300) == ok


def test_linear_logprobs_takes_the_logits_path_within_the_budget(monkeypatch):
    # N = 20, V = 300 padded to 384 in bf16: 15360 bytes of logits. A budget just above takes the
    # logits path, which makes them (N, 384) once, in the forward, and writes their gradient over
    # them: the backward makes nothing of that size. Just below, the fused path (with a backward
    # chunk of 64 columns): nothing of it.
    monkeypatch.setattr(linear_module, "CHUNK_MULTIPLE", 16)
    monkeypatch.setattr(linear_module, "SCRATCH_BYTES", 20 * 64 * 2)
    torch.manual_seed(0)
    hidden, weight, targets = linear_inputs((20,), 16, 300, torch.bfloat16)
    hidden.requires_grad_()
    weight.requires_grad_()
    logits_mib = 20 * 384 * 2 / 2**20
    for budget, logits_made in ((logits_mib, 1), (logits_mib * 0.99, 0)):
        monkeypatch.setenv("MINRLHF_LOGITS_BUDGET_MIB", str(budget))
        with NewTensors() as forward:
            lp, ent = kernels.linear_logprobs(hidden, weight, targets, temperature=0.7,
                                              return_entropy=True)
        with NewTensors() as backward:
            torch.autograd.grad((lp + ent).sum(), (hidden, weight))
        assert forward.made.count((20 * 384, torch.bfloat16)) == logits_made
        assert max(n for n, _ in backward.made) < 20 * 384
    monkeypatch.setenv("MINRLHF_LOGITS_BUDGET_MIB", "lots")
    with pytest.raises(ValueError, match="MINRLHF_LOGITS_BUDGET_MIB"):
        kernels.linear_logprobs(hidden, weight, targets)


def test_linear_logprobs_follows_the_dispatch(monkeypatch):
    # MINRLHF_KERNELS=torch runs the reference (on a GPU too); unset, CPU tensors get it
    hidden, weight, targets = linear_inputs((5,), 8, 11, torch.float32)
    expected = kernels.linear_logprobs_ref(hidden, weight, targets, temperature=0.7)
    monkeypatch.setenv("MINRLHF_KERNELS", "torch")
    assert torch.equal(kernels.linear_logprobs(hidden, weight, targets, temperature=0.7), expected)
    monkeypatch.delenv("MINRLHF_KERNELS")
    assert torch.equal(kernels.linear_logprobs(hidden.cpu(), weight.cpu(), targets.cpu(),
                                               temperature=0.7), expected.cpu())


# ---- one compile per run ---------------------------------------------------------------------

# Run in a process of its own, without the interpreter, so that the kernels are what a GPU
# compiles. It records the launches of PPO minibatches whose responses are 1, 16 and 37 tokens
# long (none runs: the tensors are on the CPU), with the launch config a GPU would get; computes
# for each the key under which Triton's JIT caches a compiled kernel, by Triton's own code
# (JITFunction.run: every argument's type and specialisation, the constexprs, the options); then
# compiles each distinct launch for an H100/H200 (sm_90) with Triton's compiler and ptxas. Prints
# {kernel: [distinct keys at each T], "compiled": {kernel: shared memory in bytes}} as JSON.
COMPILE_CHECK = r"""
import importlib, json
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import create_function_from_signature

modules = [importlib.import_module("kernels." + m)
           for m in ("logprobs", "kl", "linear_logprobs", "gae")]
logprobs, kl, linear, gae = modules
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
launches = []
for module in modules:
    for name, kernel in vars(module).items():
        if isinstance(kernel, triton.runtime.KernelInterface) and hasattr(kernel, "fn"):
            assert not isinstance(kernel, Autotuner), name + " autotunes without MINRLHF_AUTOTUNE=1"
        if hasattr(kernel, "gpu_config"):
            def record(*args, grid, warmup, name=module.__name__ + "." + name, kernel=kernel, **kw):
                launches.append((name, kernel, args, kw))
            kernel.run = record

def bind(kernel, args, kwargs):
    # the launch as a GPU makes it: the kernel's own arguments plus its launch config
    jit = kernel.fn
    config = kernel.gpu_config({**dict(zip(jit.arg_names, args)), **kwargs})
    kwargs = {**kwargs, **{k: v for k, v in config.items()
                           if k in jit.arg_names or k in ("num_warps", "num_stages")}}
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    return jit, kwargs, binder(*args, **kwargs)

def minibatch(T, dtype):
    # what one PPO minibatch launches, forward and backward, for 2 responses of T tokens
    full = torch.randn(2, T + 1, 384).to(dtype)  # a vocabulary of 300 padded to 384
    logits = full[:, :-1, :300].requires_grad_()
    targets = torch.randint(0, 300, (2, T))
    lp, ent = logprobs._TokenLogprobs.apply(logits, targets, 0.7)
    kl_t = kl._KLFull.apply(logits, full[:, 1:, :300], 0.7)
    torch.autograd.grad((lp + ent + kl_t).sum(), logits)
    hidden = torch.randn(2 * T, 64).to(dtype).requires_grad_()
    weight = torch.randn(300, 64).to(dtype).requires_grad_()
    for path in (linear._LinearLogprobs, linear._LogitsLogprobs):
        lp, ent = path.apply(hidden, weight, targets.reshape(-1), 0.7)
        torch.autograd.grad((lp + ent).sum(), (hidden, weight))
    x = torch.randn(2, T)
    gae._launch(x, x > 0, gamma=1.0, lam=0.95, rewards=x)
    gae._launch(x, x > 0, gamma=1.0, lam=0.95, scores=x[:, 0], logprobs=x, ref_logprobs=x,
                kl_coef=0.1)

# the fused path's backward in one chunk at T = 1, in 19 at T = 16 and T = 37
linear.CHUNK_MULTIPLE, linear.SCRATCH_BYTES = 16, 40 * 16 * 2
keys, to_compile = {}, {}
for dtype in (torch.bfloat16, torch.float32):
    for T in (1, 16, 37):
        launches.clear()
        minibatch(T, dtype)
        for name, kernel, args, kwargs in launches:
            jit, kwargs, (bound, spec, options) = bind(kernel, args, kwargs)
            key = str(spec) + str(options)
            keys.setdefault(f"{name} {dtype}", {}).setdefault(T, set()).add(key)
            if dtype == torch.bfloat16 or name.startswith("kernels.linear"):
                to_compile[name, key] = (jit, kwargs, bound, spec, options)
out = {name: [sorted(by_T[T]) for T in sorted(by_T)] for name, by_T in keys.items()}
out["compiled"] = {}
for (name, _), (jit, kwargs, bound, spec, options) in to_compile.items():
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, spec, options)
    compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    out["compiled"][name] = max(out["compiled"].get(name, 0), compiled.metadata.shared)
print(json.dumps(out))
"""


def run_kernels_process(code, **env):
    """Runs `code` in a Python process that imports kernels/ as a GPU machine does: without the
    interpreter (and with env added); returns its stdout."""
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **env}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_new_batch_shape_compiles_nothing_new():
    # Issue 24: on an H200 the first PPO update took 24.8 s, 17.6 s of it autotuning and
    # compiling, and each new response length tuned and compiled again (the chunk width and
    # FIRST / LAST were in the keys). Here every kernel launched for responses of 1, 16 and 37
    # tokens (1 and multiples of 16 are what Triton specialises on) must have the same compile
    # keys, and everything must compile for sm_90 within its shared memory (227 KiB a block): a
    # fixed launch config has no autotuner to skip one that does not fit. It fails on the
    # kernels before this change: FIRST and LAST were constexprs, N and T were specialised on.
    out = json.loads(run_kernels_process(COMPILE_CHECK))
    compiled = out.pop("compiled")
    assert len(out) == 2 * 8  # every kernel, in bf16 and fp32
    for name, keys_by_T in out.items():
        assert len(keys_by_T) == 3, f"{name} was not launched for every T"
        assert all(keys == keys_by_T[0] for keys in keys_by_T), \
            f"{name} compiles again for a new T:\n" + "\n".join(map(str, keys_by_T))
    assert len(compiled) == 8 and max(compiled.values()) <= 227 * 1024, compiled


def test_autotuning_is_opt_in_and_cached():
    # MINRLHF_AUTOTUNE=1 makes every kernel a triton.autotune over its CONFIGS, with the timings
    # cached on disk; without it (test_a_new_batch_shape_compiles_nothing_new) none autotunes.
    out = run_kernels_process(
        "import importlib, triton\n"
        "from triton.runtime.autotuner import Autotuner\n"
        "for m in ('logprobs', 'kl', 'linear_logprobs', 'gae'):\n"
        "    module = importlib.import_module('kernels.' + m)\n"
        "    for name, k in vars(module).items():\n"
        "        if isinstance(k, Autotuner):\n"
        "            print(m, name, len(k.configs), k.cache_results)\n",
        MINRLHF_AUTOTUNE="1")
    tuned = {tuple(line.split()[:2]): line.split()[2:] for line in out.splitlines()}
    configs = {"logprobs": kernels.logprobs.CONFIGS, "kl": kernels.logprobs.CONFIGS,
               "linear_logprobs": linear_module.FWD_CONFIGS, "gae": gae_module.CONFIGS}
    assert len(tuned) == 8
    for (module, name), (n_configs, cached) in tuned.items():
        assert int(n_configs) == len(configs[module]) > 1 and cached == "True", (module, name)


# ---- gae and ppo_advantages ------------------------------------------------------------------

def random_rollout(B, T, mask_dtype):
    lengths = torch.randint(0, T + 1, (B,))
    lengths[0], lengths[-1] = 0, T  # an all-masked row and a full one
    mask = (torch.arange(T) < lengths[:, None]).to(mask_dtype)
    # padding holds junk that must not leak into the outputs
    junk = lambda: torch.where(mask.bool(), torch.randn(B, T), torch.tensor(1e4))
    return lengths, mask.to(DEVICE), junk().to(DEVICE), junk().to(DEVICE)


GAE_CASES = [(1, 1), (3, 1), (4, 37), (2, 1500)]  # T = 1; odd T; T over the 1024-step chunk
GAMMA_LAM = [(1.0, 0.95), (0.9, 0.0), (0.99, 1.0)]  # the defaults; no bootstrap; plain returns


@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("B,T", GAE_CASES)
def test_gae(B, T, mask_dtype, gamma, lam):
    torch.manual_seed(0)
    lengths, mask, rewards, values = random_rollout(B, T, mask_dtype)
    advantages64, returns64, advantages_bound, returns_bound = gae_fp64(rewards, values, lengths,
                                                                        gamma, lam)
    for fn in (gae, gae_ref, gae_doubling_ref):
        advantages, returns = fn(rewards, values, mask, gamma=gamma, lam=lam)
        assert_within(advantages, advantages64, advantages_bound)
        assert_within(returns, returns64, returns_bound)


def test_gae_in_short_chunks(monkeypatch):
    # chunks of 16 steps: many carries from one chunk to the one before, in gae and ppo_advantages
    monkeypatch.setattr(gae_module, "INTERPRET_BLOCK_T", 16)
    test_gae(4, 37, torch.bool, 1.0, 0.95)
    test_gae(2, 1500, torch.bool, 0.99, 1.0)
    test_ppo_advantages(4, 37, "k3")


@pytest.mark.parametrize("config", configs_to_run(gae_module.CONFIGS, "BLOCK_T"), ids=str)
def test_gae_every_gpu_chunk(monkeypatch, config):
    # MINRLHF_AUTOTUNE=1 picks among these chunk lengths; each runs here once, over a chunk and
    # a bit (one row, T one past the chunk)
    force_config(monkeypatch, gae_module, config.all_kwargs())
    torch.manual_seed(0)
    T = config.kwargs["BLOCK_T"] + 1
    lengths = torch.tensor([T])
    rewards, values = torch.randn(2, 1, T, device=DEVICE)
    advantages64, returns64, advantages_bound, returns_bound = gae_fp64(rewards, values, lengths,
                                                                        1.0, 0.95)
    advantages, returns = gae(rewards, values, torch.ones(1, T, device=DEVICE), gamma=1.0, lam=0.95)
    assert_within(advantages, advantages64, advantages_bound)
    assert_within(returns, returns64, returns_bound)


def test_gae_tolerance_can_fail():
    # The bound grows with T and gamma * lam; at the loosest case it must still catch what a
    # chunked scan gets wrong: a carry dropped at a chunk boundary (step 1024), or the decay
    # gamma where it should be gamma * lam.
    torch.manual_seed(0)
    lengths, mask, rewards, values = random_rollout(2, 1500, torch.bool)
    advantages64, _, bound, _ = gae_fp64(rewards, values, lengths, 0.99, 1.0)
    row = 1  # the full row
    t = torch.arange(1024)
    dropped = advantages64.clone()
    dropped[row, :1024] -= 0.99 ** (1024 - t) * advantages64[row, 1024]
    assert ((dropped - advantages64).abs() > bound).any()
    advantages64, _, bound, _ = gae_fp64(rewards, values, lengths, 1.0, 0.95)
    wrong_decay = gae_fp64(rewards, values, lengths, 1.0, 1.0)[0]
    assert ((wrong_decay - advantages64).abs() > bound).any()


def kl_fp64_estimate(logprobs, ref_logprobs, kl_estimator):
    log_ratio = ref_logprobs.double() - logprobs.double()
    return {"k1": -log_ratio, "k2": log_ratio**2 / 2,
            "k3": log_ratio.exp() - 1 - log_ratio}[kl_estimator]


def kl_estimate_bound(logprobs, ref_logprobs, kl_estimator):
    # fp32 error of an estimator of log r = ref_logprobs - logprobs: one rounding of log r, then a
    # few operations (k3: an exp, whose argument's rounding counts |log r| times); with K the
    # size of its terms, <= 8u (1 + |log r|) K
    log_ratio = (ref_logprobs.double() - logprobs.double()).abs()
    size = {"k1": log_ratio, "k2": log_ratio**2, "k3": log_ratio.exp() + 1 + log_ratio}
    return 8 * U * (1 + log_ratio) * size[kl_estimator]


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("B,T", GAE_CASES)
def test_ppo_advantages(B, T, kl_estimator):
    torch.manual_seed(0)
    lengths, mask, logprobs, values = random_rollout(B, T, torch.int64)
    ref_logprobs = torch.where(mask.bool(), logprobs + torch.randn_like(logprobs), 1e4)
    scores = torch.randn(B, device=DEVICE)
    kl_coef, gamma, lam = 0.05, 1.0, 0.95
    valid = mask.bool().cpu()
    kl64 = torch.where(valid, kl_fp64_estimate(logprobs, ref_logprobs, kl_estimator).cpu(), 0.0)
    kl_bound = torch.where(valid, kl_estimate_bound(logprobs, ref_logprobs, kl_estimator).cpu(),
                           0.0)
    rewards64 = -kl_coef * kl64
    for b, n in enumerate(lengths.tolist()):
        if n > 0:
            rewards64[b, n - 1] += scores[b].item()
    # the reward -kl_coef * kl (+ score) in fp32: kl's error, then a product and a sum
    reward_error = kl_coef * kl_bound + U * (2 * kl_coef * kl64.abs() + rewards64.abs())
    advantages64, returns64, advantages_bound, returns_bound = gae_fp64(
        rewards64, values, lengths, gamma, lam, reward_error)
    for fn in (ppo_advantages, ppo_advantages_ref):
        advantages, returns, kl = fn(scores, logprobs, ref_logprobs, values, mask, kl_coef=kl_coef,
                                     gamma=gamma, lam=lam, kl_estimator=kl_estimator)
        assert_within(kl, kl64, kl_bound)
        assert_within(advantages, advantages64, advantages_bound)
        assert_within(returns, returns64, returns_bound)


def test_ppo_advantages_rejects_an_unknown_estimator():
    x = torch.zeros(2, 3, device=DEVICE)
    for fn in (ppo_advantages, ppo_advantages_ref):
        with pytest.raises(ValueError, match="kl_estimator"):
            fn(x[:, 0], x, x, x, x, kl_coef=0.1, gamma=1.0, lam=0.95, kl_estimator="k4")


# ---- references by hand ----------------------------------------------------------------------

def test_gae_ref_by_hand():
    # gamma = 0.9, lam = 0.5, so gamma * lam = 0.45; worked out on paper from
    #   delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  R_t = A_t + V_t
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 1.0], [5.0, 5.0, 5.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.2, 0.4, 0.6], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    # row 0: the masked reward 2 and value 1.5 are ignored and V after the last token is 0:
    #   A_1 = 0 + 0 - 1 = -1;  A_0 = (1 + 0.9 * 1 - 0.5) + 0.45 * -1 = 0.95
    # row 1: A_2 = 1 - 0.6 = 0.4;  A_1 = (0.9 * 0.6 - 0.4) + 0.45 * 0.4 = 0.32
    #        A_0 = (0.9 * 0.4 - 0.2) + 0.45 * 0.32 = 0.304
    # row 2: all masked, all zeros
    for fn in (gae_ref, gae):
        advantages, returns = fn(rewards.to(DEVICE), values.to(DEVICE), mask.to(DEVICE),
                                 gamma=0.9, lam=0.5)
        torch.testing.assert_close(advantages.cpu(), torch.tensor(
            [[0.95, -1.0, 0.0], [0.304, 0.32, 0.4], [0.0, 0.0, 0.0]]))
        torch.testing.assert_close(returns.cpu(), torch.tensor(
            [[1.45, 0.0, 0.0], [0.504, 0.72, 1.0], [0.0, 0.0, 0.0]]))


def test_ppo_advantages_ref_by_hand():
    # kl_coef = 0.5, gamma = lam = 1, so A_t = (sum of rewards from t on) - V_t
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -9.0]])
    values = torch.tensor([[0.25, 0.5, 7.0]])
    mask = torch.tensor([[True, True, False]])
    scores = torch.tensor([3.0])
    # k1 = logprobs - ref_logprobs = [0.5, -1.0, (masked)]; rewards = [-0.25, 0.5 + 3 (score), 0]
    for fn in (ppo_advantages_ref, ppo_advantages):
        advantages, returns, kl = fn(*(t.to(DEVICE) for t in (scores, logprobs, ref_logprobs,
                                                               values, mask)),
                                     kl_coef=0.5, gamma=1.0, lam=1.0)
        torch.testing.assert_close(kl.cpu(), torch.tensor([[0.5, -1.0, 0.0]]))
        torch.testing.assert_close(advantages.cpu(), torch.tensor([[3.25 - 0.25, 3.5 - 0.5, 0.0]]))
        torch.testing.assert_close(returns.cpu(), torch.tensor([[3.25, 3.5, 0.0]]))
