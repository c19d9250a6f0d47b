"""Where Triton does not install (macOS has no wheel): kernels/ still imports, each public function
runs its PyTorch reference, MINRLHF_KERNELS=triton says in one sentence that Triton is missing,
and the stages run. Each check runs in a subprocess in which `import triton` fails."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# None in sys.modules makes `import triton` raise ImportError, as where it is not installed
WITHOUT_TRITON = "import sys; sys.modules['triton'] = None\n"

KERNELS_ON_CPU = """
import os, runpy
import torch
import kernels
from kernels._common import HAVE_TRITON, NO_TRITON
assert not HAVE_TRITON

torch.manual_seed(0)
logits = torch.randn(2, 3, 11, requires_grad=True)
ref_logits = torch.randn(2, 3, 11)
targets = torch.randint(0, 11, (2, 3))
values, rewards = torch.randn(2, 2, 5)
mask = torch.arange(5) < torch.tensor([[3], [5]])
hidden, weight = torch.randn(2, 3, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
calls = {  # each public function beside its reference
    "token_logprobs": (lambda f: f(logits, targets, temperature=0.7, return_entropy=True),
                       kernels.token_logprobs, kernels.token_logprobs_ref),
    "kl_full": (lambda f: f(logits, ref_logits, temperature=0.7),
                kernels.kl_full, kernels.kl_full_ref),
    "gae": (lambda f: f(rewards, values, mask, gamma=1.0, lam=0.95), kernels.gae, kernels.gae_ref),
    "ppo_advantages": (lambda f: f(rewards[:, 0], rewards, values, values, mask, kl_coef=0.1,
                                   gamma=1.0, lam=0.95),
                       kernels.ppo_advantages, kernels.ppo_advantages_ref),
    "linear_logprobs": (lambda f: f(hidden, weight, targets, temperature=0.7, return_entropy=True),
                        kernels.linear_logprobs, kernels.linear_logprobs_ref),
}
for name, (call, fn, ref) in calls.items():
    outputs, expected = call(fn), call(ref)
    if not isinstance(outputs, tuple):
        outputs, expected = (outputs,), (expected,)
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected)), name
token_logprobs = kernels.token_logprobs(logits, targets)
torch.autograd.grad(token_logprobs.sum(), logits)  # and the gradient flows

os.environ["MINRLHF_KERNELS"] = "triton"
for name, (call, fn, ref) in calls.items():
    try:
        call(fn)
    except RuntimeError as e:
        assert str(e) == NO_TRITON, (name, str(e))
    else:
        raise AssertionError(f"{name} ran with MINRLHF_KERNELS=triton and no Triton")
print(NO_TRITON)

import ppo  # noqa: F401  (the stage that calls the kernels imports)

try:  # the benchmark says there is nothing to time, and exits 0
    runpy.run_module("kernels.bench", run_name="__main__")
except SystemExit as e:
    assert e.code == 0, e.code
"""


def run_without_triton(code, *args):
    env = {k: v for k, v in os.environ.items() if k != "MINRLHF_KERNELS"}
    return subprocess.run([sys.executable, "-c", WITHOUT_TRITON + code, *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_kernels_run_their_references_without_triton():
    done = run_without_triton(KERNELS_ON_CPU)
    assert done.returncode == 0, done.stderr
    sentence = done.stdout.splitlines()[0]
    # one sentence that names what is missing and what to do
    assert sentence.startswith("MINRLHF_KERNELS=triton, but Triton is not installed")
    assert "pip install triton" in sentence and sentence.count(". ") == 0
    assert "Triton is not installed" in done.stdout.splitlines()[1]  # kernels.bench


def test_sft_runs_without_triton(tmp_path):
    done = run_without_triton(
        "import runpy; sys.argv[0] = 'sft.py'; runpy.run_path('sft.py', run_name='__main__')",
        "--device", "cpu", "--n_layer", "1", "--n_embd", "32", "--n_head", "2",
        "--max_steps", "3", "--batch_size", "8", "--n_demos", "64", "--eval_every", "3",
        "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ckpt.pt").exists()
