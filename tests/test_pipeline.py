"""The whole pipeline, end to end: QUICK=1 ROUNDS=2 ./train.sh, the tiny version of the default run,
PPO and DPO side by side, and a second round on new prompts. (Each trainer under torchrun is run by
test_stages.py, test_dpo.py and test_ensemble.py.)"""

import json
import math
import os
import subprocess

from conftest import ROOT


def test_quick_pipeline_two_rounds_ppo_and_dpo_beat_sft_under_the_gold_judge(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "QUICK": "1", "OUT": str(out), "ROUNDS": "2"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "train.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    policy_keys = ["gold", "rm_score", "kl_exact", "win_rate_vs_sft", "perplexity"]
    for section, keys in {"sft": ["gold", "val_loss"], "reward": ["val_accuracy"], "ppo": policy_keys, "dpo": policy_keys,
                          "seconds": ["sft", "reward", "ppo", "dpo", "total"]}.items():
        assert set(keys) <= set(summary[section]), (section, summary[section])
    # RLHF did something a person would want: better under the hidden judge, and it says so
    for method in ("ppo", "dpo"):
        assert summary[method]["gold"] > summary["sft"]["gold"], (method, summary)
        assert summary[method]["win_rate_vs_sft"] > 0.5, (method, summary)
        assert summary[method]["kl_exact"] > 0.05, (method, summary)  # it moved away from SFT, measurably
    assert summary["reward"]["val_accuracy"] > 0.5, summary  # better than chance against gold
    sft_eval = json.loads((out / "eval_ppo.json").read_text())["models"]
    assert list(sft_eval.values())[1]["kl_exact"] == 0  # SFT against itself: the exact KL is exactly 0
    # round 2 sampled new prompts, trained again, and was scored like round 1
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for row in summary["rounds"]:
        for method in ("ppo", "dpo"):
            assert all(math.isfinite(row[method][k]) for k in policy_keys), row
    assert summary["ppo"] == summary["rounds"][1]["ppo"]  # the top-level entries are the last round's
    r1 = [json.loads(line)["prompt"] for line in open(out / "rankings.jsonl")]
    r2 = [json.loads(line)["prompt"] for line in open(out / "round2" / "rankings.jsonl")]
    assert r2 and not set(r1) & set(r2)
    assert sum(1 for _ in open(out / "round2" / "rankings_all.jsonl")) == len(r1) + len(r2)
    for text in ("PPO wins", "DPO wins", "round 2:", "SFT [", "PPO ["):
        assert text in proc.stdout, text
