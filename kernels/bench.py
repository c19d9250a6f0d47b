"""Times each kernel against its PyTorch reference, eager and under torch.compile, on a GPU.

    python -m kernels.bench                  # every op
    python -m kernels.bench --op gae         # one op (token_logprobs, kl_full, gae, ppo_advantages,
                                             #   linear_logprobs)
    python -m kernels.bench | tee benchmarks/kernels-$(date +%F).txt

For each op and shape it prints, per provider: the median time of triton.testing.do_bench (ms),
the speedup of Triton over it (its ms / Triton's ms), the bandwidth it reaches (GB/s), that as a
fraction of this device's measured copy bandwidth (a device-to-device copy of 1 GiB), the peak
memory it allocates beyond its inputs, and how far its output is from the eager reference's.
GB/s counts the bytes the op cannot avoid moving: each (N, V) or (B, T) tensor read or written
once; the per-row terms (targets, a few floats per row) are under 0.1% and left out.

Shapes: token_logprobs and kl_full at N = 16384 tokens, V = 50257 (GPT-2) and 128256 (Llama 3),
bf16 logits, forward and forward + backward; gae and ppo_advantages at B = 512, T = 2048, fp32.
The GAE references are the Python loop over T (gae_ref) and the best vectorised PyTorch we have
(gae_doubling_ref); torch.compile gets the vectorised one, since the loop would unroll 2048 steps.
linear_logprobs at N, H, V = 2048, 768, 50257 (a PPO minibatch of 16 x 128 tokens at GPT-2),
16384, 768, 50257 and 8192, 4096, 128256, bf16, forward + backward, through each of its two paths,
rated in TFLOP/s against its matmul floor instead of GB/s (see linear_cases).
Without a GPU, or without Triton, it says so and exits 0.

The kernels run one launch config per kind of shape; with MINRLHF_AUTOTUNE=1 they autotune
instead, and the benchmark ends with what the autotuner picked for each kernel and key: the
evidence for changing the fixed configs.
"""

import argparse
import datetime
import os
import sys

import torch

import kernels
from kernels._common import AUTOTUNE, HAVE_TRITON, triton
from kernels.gae import gae_doubling_ref

N_TOKENS, VOCABS = 16384, (50257, 128256)
B, T = 512, 2048
# (N, H, V): a PPO minibatch at GPT-2 small, a long batch at GPT-2 small, Llama 3 8B
LINEAR_SHAPES = ((2048, 768, 50257), (16384, 768, 50257), (8192, 4096, 128256))
DEVICE = "cuda"
GB = 1e9


def copy_bandwidth():
    """GB/s of a device-to-device copy of 1 GiB: read once, write once."""
    src = torch.empty(2**30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / GB


def peak_mib(fn):
    """Peak memory that one call of fn allocates beyond what is already allocated, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def first_output(out):
    """The tensor to compare across providers: the first output, or the first gradient."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def max_abs_diff(a, b):
    # row blocks, so that comparing two (N, V) gradients makes no (N, V) fp32 temporary
    pairs = zip(a.split(256), b.split(256))
    return max((x.float() - y.float()).abs().max().item() for x, y in pairs)


def forward_backward(op, *inputs):
    """fn() running op(*inputs) and the gradients of the sum of its outputs w.r.t. the inputs."""
    inputs = [x.detach().requires_grad_() for x in inputs]

    def fn():
        out = op(*inputs)
        loss = sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()
        return torch.autograd.grad(loss, inputs)
    return fn


def measure(providers, returned_bytes=0):
    """Times each provider (name -> fn()): [name, ms, peak MiB, max |diff|] each, None for ms and
    peak where it ran out of memory. The first provider is Triton, the second the eager reference
    that every output is compared with. returned_bytes (the gradients an op must return) are not
    counted in the peak."""
    results, outputs = [], []  # (name, ms, peak MiB, max |diff|); Triton's and the reference's
    for i, (name, fn) in enumerate(providers.items()):
        try:
            out = first_output(fn())
            ms = triton.testing.do_bench(fn, return_mode="median")
            peak = peak_mib(fn) - returned_bytes / 2**20
        except torch.cuda.OutOfMemoryError:
            out = ms = peak = None
            torch.cuda.empty_cache()
        results.append([name, ms, peak, None])
        if i < 2:
            outputs.append(out)
        elif out is not None and outputs[1] is not None:
            results[i][3] = max_abs_diff(out, outputs[1])
        del out
    if all(out is not None for out in outputs):
        results[0][3], results[1][3] = max_abs_diff(*outputs), 0.0
    return results


def print_table(title, rate_names, rates, results):
    """One table of measure()'s results: provider, ms, speedup of Triton over it, two rate columns
    (rates(ms) gives their two values), peak MiB and max |diff|."""
    print(f"\n{title}")
    print(f"{'provider':<26}{'ms':>10}{'speedup':>10}{rate_names[0]:>9}{rate_names[1]:>9}"
          f"{'peak MiB':>10}{'max |diff|':>12}")
    triton_ms = results[0][1] or float("nan")
    for name, ms, peak, diff in results:
        if ms is None:
            print(f"{name:<26}{'out of memory':>14}")
            continue
        diff = "-" if diff is None else f"{diff:.2e}"
        print(f"{name:<26}{ms:>10.3f}{ms / triton_ms:>10.2f}{rates(ms)[0]:>9}{rates(ms)[1]:>9}"
              f"{peak:>10.0f}{diff:>12}")


def run_case(title, nbytes, providers, bandwidth):
    """Times the providers and prints one table, rated by the bytes the op must move."""
    def rates(ms):
        gbps = nbytes / (ms * 1e-3) / GB
        return f"{gbps:.0f}", f"{gbps / bandwidth:.0%}"
    print_table(f"{title}   ({nbytes / GB:.2f} GB moved at least)", ("GB/s", "of copy"), rates,
                measure(providers))


def logprob_cases(bandwidth):
    for V in VOCABS:
        logits = torch.randn(N_TOKENS, V, device=DEVICE, dtype=torch.bfloat16) * 4
        targets = torch.randint(0, V, (N_TOKENS,), device=DEVICE)
        nbytes = logits.numel() * logits.element_size()  # one read or write of the logits

        def op(x, fn=kernels.token_logprobs):  # the PPO call: at temperature, with the entropy
            return fn(x, targets, temperature=0.7, return_entropy=True)

        def ref(x):
            return kernels.token_logprobs_ref(x, targets, temperature=0.7, return_entropy=True)
        compiled = torch.compile(ref)
        shape = f"N={N_TOKENS} V={V} bf16"
        run_case(f"token_logprobs forward, {shape}", nbytes, {
            "triton": lambda: op(logits), "torch": lambda: ref(logits),
            "torch.compile": lambda: compiled(logits)}, bandwidth)
        # forward reads the logits; backward reads them again and writes the gradient
        run_case(f"token_logprobs forward + backward, {shape}", 3 * nbytes, {
            "triton": forward_backward(op, logits), "torch": forward_backward(ref, logits),
            "torch.compile": forward_backward(compiled, logits)}, bandwidth)
        del logits


def kl_cases(bandwidth):
    for V in VOCABS:
        logits = torch.randn(N_TOKENS, V, device=DEVICE, dtype=torch.bfloat16) * 4
        ref_logits = torch.randn(N_TOKENS, V, device=DEVICE, dtype=torch.bfloat16) * 4
        nbytes = logits.numel() * logits.element_size()

        def op(x):
            return kernels.kl_full(x, ref_logits, temperature=0.7)

        def ref(x):
            return kernels.kl_full_ref(x, ref_logits, temperature=0.7)
        compiled = torch.compile(ref)
        shape = f"N={N_TOKENS} V={V} bf16"
        run_case(f"kl_full forward, {shape}", 2 * nbytes, {
            "triton": lambda: op(logits), "torch": lambda: ref(logits),
            "torch.compile": lambda: compiled(logits)}, bandwidth)
        # forward reads both; backward reads both again and writes the gradient
        run_case(f"kl_full forward + backward, {shape}", 5 * nbytes, {
            "triton": forward_backward(op, logits), "torch": forward_backward(ref, logits),
            "torch.compile": forward_backward(compiled, logits)}, bandwidth)
        del logits, ref_logits


def rollout():
    """A batch of B responses of random lengths 1..T: fp32 (B, T) tensors and a bool mask."""
    lengths = torch.randint(1, T + 1, (B,), device=DEVICE)
    mask = torch.arange(T, device=DEVICE) < lengths[:, None]
    return [torch.randn(B, T, device=DEVICE) for _ in range(3)], mask


def gae_cases(bandwidth):
    (rewards, values, _), mask = rollout()
    kw = dict(gamma=1.0, lam=0.95)
    compiled = torch.compile(gae_doubling_ref)
    # reads rewards, values (fp32) and the mask (1 byte), writes advantages and returns (fp32)
    run_case(f"gae, B={B} T={T} fp32", B * T * (4 + 4 + 1 + 4 + 4), {
        "triton": lambda: kernels.gae(rewards, values, mask, **kw),
        "torch (loop over T)": lambda: kernels.gae_ref(rewards, values, mask, **kw),
        "torch (doubling)": lambda: gae_doubling_ref(rewards, values, mask, **kw),
        "torch.compile (doubling)": lambda: compiled(rewards, values, mask, **kw)}, bandwidth)


def ppo_advantages_cases(bandwidth):
    (logprobs, ref_logprobs, values), mask = rollout()
    scores = torch.randn(B, device=DEVICE)
    args = (scores, logprobs, ref_logprobs, values, mask)
    kw = dict(kl_coef=0.05, gamma=1.0, lam=0.95, kl_estimator="k1")

    def doubling(*a, **k):
        return kernels.ppo_advantages_ref(*a, **k, gae_fn=gae_doubling_ref)
    compiled = torch.compile(doubling)
    # reads logprobs, ref_logprobs, values and the mask, writes advantages, returns and kl
    run_case(f"ppo_advantages, B={B} T={T} fp32", B * T * (3 * 4 + 1 + 3 * 4), {
        "triton": lambda: kernels.ppo_advantages(*args, **kw),
        "torch (loop over T)": lambda: kernels.ppo_advantages_ref(*args, **kw),
        "torch (doubling)": lambda: doubling(*args, **kw),
        "torch.compile (doubling)": lambda: compiled(*args, **kw)}, bandwidth)


def linear_cases(bandwidth):
    """linear_logprobs forward + backward (both gradients) at the shapes of its goals, through its
    fused path ("triton") and its logits path ("triton, logits": one matmul on the vocabulary
    padded to 128, then token_logprobs, whatever the logits' size; by default linear_logprobs
    takes it where they fit in 1 GiB), against the lm_head matmul followed by token_logprobs
    (eager, compiled, and the Triton kernel, all on the unpadded vocabulary), and
    Liger-Kernel's fused linear cross entropy and Cut Cross-Entropy where they import (their
    -loss per token is the log-prob; CCE filtered skips small gradient tiles, CCE exact does not).
    The op's floor is four matmuls of the logits' size (forward, one recompute, two gradients),
    timed here as four times cuBLAS's hidden @ weight.T. 'peak MiB' leaves out the two gradients,
    which every provider returns: what is left is scratch."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:  # not installed, or its API moved
        liger_fused_linear_cross_entropy = None
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception:
        linear_cross_entropy = None
    for N, H, V in LINEAR_SHAPES:
        hidden = (torch.randn(N, H, device=DEVICE) * 0.5).to(torch.bfloat16)
        weight = (torch.randn(V, H, device=DEVICE) * 0.02).to(torch.bfloat16)
        targets = torch.randint(0, V, (N,), device=DEVICE)
        compiled = torch.compile(kernels.linear_logprobs_ref)
        providers = {
            "triton": lambda h, w: kernels.linear_logprobs(h, w, targets, logits_budget_mib=0),
            "matmul + torch": lambda h, w: kernels.linear_logprobs_ref(h, w, targets),
            "triton, logits": lambda h, w: kernels.linear_logprobs(
                h, w, targets, logits_budget_mib=float("inf")),
            "torch.compile": lambda h, w: compiled(h, w, targets),
            "matmul + triton": lambda h, w: kernels.token_logprobs(h @ w.T, targets)}
        if liger_fused_linear_cross_entropy is not None:
            providers["liger FLCE"] = lambda h, w: -liger_fused_linear_cross_entropy(
                h, w, targets, reduction="none")
        if linear_cross_entropy is not None:
            providers["CCE filtered"] = lambda h, w: -linear_cross_entropy(
                h, w, targets, reduction="none")
            providers["CCE exact"] = lambda h, w: -linear_cross_entropy(
                h, w, targets, reduction="none", filter_eps=None)
        matmul_ms = triton.testing.do_bench(lambda: hidden @ weight.T, return_mode="median")
        results = measure({name: forward_backward(op, hidden, weight)
                           for name, op in providers.items()},
                          returned_bytes=(hidden.numel() + weight.numel()) * 2)
        def rates(ms):  # 4 matmuls of 2NHV flops; the floor is 4 of cuBLAS's
            return f"{8 * N * H * V / (ms * 1e-3) / 1e12:.0f}", f"{ms / (4 * matmul_ms):.2f}"
        print_table(f"linear_logprobs forward + backward, N={N} H={H} V={V} bf16   (floor: "
                    f"4 matmuls of {matmul_ms:.3f} ms = {4 * matmul_ms:.2f} ms)",
                    ("TFLOP/s", "x floor"), rates, results)
        del hidden, weight, targets, compiled, providers
        torch.cuda.empty_cache()


CASES = {"token_logprobs": logprob_cases, "kl_full": kl_cases, "gae": gae_cases,
         "ppo_advantages": ppo_advantages_cases, "linear_logprobs": linear_cases}


def main():
    parser = argparse.ArgumentParser(description="Time the Triton kernels against PyTorch.")
    parser.add_argument("--op", choices=sorted(CASES), help="only this op (default: all)")
    args = parser.parse_args()
    if not HAVE_TRITON:
        print("kernels.bench: Triton is not installed, and the benchmark times Triton kernels; "
              "nothing to run.")
        return 0
    if not torch.cuda.is_available():
        print("kernels.bench: no CUDA GPU on this machine, and the benchmark times GPU kernels; "
              "nothing to run.")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernels.bench: TRITON_INTERPRET=1 would time the interpreter; unset it.")
        return 1
    os.environ["MINRLHF_KERNELS"] = "triton"  # what a CUDA tensor gets anyway; stated here
    bandwidth = copy_bandwidth()
    print(f"{datetime.date.today()}  {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {triton.__version__}")
    print(f"measured copy bandwidth: {bandwidth:.0f} GB/s; 'peak MiB' is beyond the inputs; "
          f"'max |diff|' is against the eager reference")
    for name, cases in CASES.items():
        if args.op in (None, name):
            cases(bandwidth)
            torch.cuda.empty_cache()
    if AUTOTUNE:
        print_autotuned()
    return 0


def print_autotuned():
    """What MINRLHF_AUTOTUNE=1 picked, per kernel and tuning key (arguments, then dtypes)."""
    print("\nautotuned (MINRLHF_AUTOTUNE=1): kernel, key -> config")
    for module in (kernels.logprobs, kernels.kl, sys.modules["kernels.linear_logprobs"],
                   sys.modules["kernels.gae"]):
        for name, kernel in vars(module).items():
            if isinstance(kernel, triton.runtime.Autotuner):
                for key, config in kernel.cache.items():
                    print(f"{module.__name__}.{name}  {key} -> {config}")


if __name__ == "__main__":
    sys.exit(main())
