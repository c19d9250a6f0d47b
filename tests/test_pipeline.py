"""The whole pipeline, end to end: NPROC=2 QUICK=1 ./train.sh, the tiny version of the default run
with every training stage under torchrun (the single-process stages are run by test_stages.py)."""

import json
import os
import subprocess

from conftest import ROOT


def test_quick_pipeline_ppo_beats_sft_under_the_gold_judge(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "QUICK": "1", "OUT": str(out), "NPROC": "2"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "train.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for section, keys in {"sft": ["gold", "val_loss"], "reward": ["val_accuracy"],
                          "ppo": ["gold", "rm_score", "kl", "win_rate_vs_sft"],
                          "seconds": ["sft", "reward", "ppo", "total"]}.items():
        assert set(keys) <= set(summary[section]), (section, summary[section])
    # RLHF did something a person would want: better under the hidden judge, and it says so
    assert summary["ppo"]["gold"] > summary["sft"]["gold"], summary
    assert summary["ppo"]["win_rate_vs_sft"] > 0.5, summary
    assert summary["ppo"]["kl"] > 0, summary
    assert summary["reward"]["val_accuracy"] > 0.5, summary  # better than chance against gold
    assert "PPO wins" in proc.stdout and "SFT [" in proc.stdout and "PPO [" in proc.stdout
