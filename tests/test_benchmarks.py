"""benchmarks/ppo_step.py runs on a CPU (a tiny shape) and prints both paths and their ratios;
the GPU numbers come from the same script on a GPU. No test asserts a time."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("transformers")


def test_ppo_step_benchmark_runs_both_paths_over_new_prompt_widths():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "benchmarks/ppo_step.py", "--updates", "3"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for path in ("ours", "HF"):
        widths = re.findall(rf"^{path}\s+update \d+\s+P=\s*(\d+)", out, re.M)
        assert len(widths) == 3 and len(set(widths)) > 1, out  # new prompt widths, as PPO brings
    for row in ("ours, first update", "ours, median of the rest", "HF, first update", "HF / ours, first", "HF / ours, median"):
        assert re.search(rf"^{re.escape(row)}\s+\S", out, re.M), row
    # each ratio is the HF path's milliseconds over ours, phase by phase, as printed above it
    def row(name):
        return [float(x.rstrip("x")) for x in re.search(rf"^{re.escape(name)}\s+(.*)$", out, re.M).group(1).split()]
    for which, label in (("first", "first update"), ("median", "median of the rest")):
        ours, hf, ratios = row(f"ours, {label}"), row(f"HF, {label}"), row(f"HF / ours, {which}")
        assert len(ratios) == 4 and len(ours) == len(hf) == 5, out
        for o, h, r in zip(ours, hf, ratios):
            assert r == pytest.approx(h / o, rel=0.02, abs=0.006), (which, o, h, r)
