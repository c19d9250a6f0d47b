"""dpo.py: its losses by hand on a tiny case, then the stage run as a user runs it (one process,
torchrun with two, resumed after a kill) on a tiny random policy, and eval.py taking the result."""

import json
import math

import pytest

from data import task
from test_resume import killed_once, same_run
from test_stages import loads_safely, metrics, one_sentence, run, tiny_ckpts, write_rankings  # noqa: F401  (a fixture)


# ----------------------------------------------------------------------------- the stage

@pytest.fixture(scope="module")
def rankings(tmp_path_factory):
    d = tmp_path_factory.mktemp("rankings")
    train = task.prompts("train")
    write_rankings(d / "train.jsonl", train[:32])
    write_rankings(d / "val.jsonl", train[32:40], seed=1)
    return d


DPO_ARGS = ["--batch_size", 8, "--epochs", 1, "--eval_every", 2, "--kl_prompts", 4, "--max_new_tokens", 8]


def dpo_run(tiny_ckpts, rankings, out, *args, nproc=1):
    return run("dpo.py", "--data", rankings / "train.jsonl", "--val_data", rankings / "val.jsonl",
               "--init", tiny_ckpts / "policy.pt", *DPO_ARGS, *args, "--out", out, nproc=nproc)


def test_dpo_starts_at_the_reference_and_moves_away(tiny_ckpts, rankings, tmp_path):
    dpo_run(tiny_ckpts, rankings, tmp_path / "dpo", "--lr", 3e-3, "--nll_coef", 0)  # the DPO loss alone
    rows = metrics(tmp_path / "dpo")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    first = rows[0]  # before any step the policy is its reference: every implicit reward is exactly 0
    assert first["val/rewards/chosen"] == 0 and first["val/rewards/rejected"] == 0 and first["val/kl_exact"] == 0
    assert first["val/loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the first batch, too, is scored before any update
    last = rows[-1]
    assert last["val/kl_exact"] > 0 and last["rewards/margin"] > 0 and last["loss"] < math.log(2)
    for key in ("rewards/chosen", "rewards/rejected", "accuracy", "val/accuracy", "val/rewards/margin", "val/gold"):
        assert math.isfinite(last[key]), key
    ckpt = loads_safely(tmp_path / "dpo" / "ckpt.pt")
    assert ckpt["kind"] == "policy" and ckpt["step"] == 4
    # a policy like any other: eval.py scores it against the SFT model it started from
    run("eval.py", "--init", tmp_path / "dpo" / "ckpt.pt", "--compare", tiny_ckpts / "policy.pt",
        "--ref", tiny_ckpts / "policy.pt", "--n", 8, "--max_new_tokens", 8, "--demos", "", "--out", tmp_path / "eval.json")
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["models"][str(tmp_path / "dpo" / "ckpt.pt")]["kl_exact"] > 0 and 0 <= ev["win_rate"] <= 1


def test_dpo_same_loss_on_one_and_two_processes(tiny_ckpts, rankings, tmp_path):
    # every loss is a per-prompt mean, so one process with the whole batch and two with half each agree
    dpo_run(tiny_ckpts, rankings, tmp_path / "one", "--micro_batch_size", 8)
    dpo_run(tiny_ckpts, rankings, tmp_path / "two", nproc=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 1, 2, 3, 4]
    for a, b in zip(one[1:], two[1:]):
        for key in ("loss", "rewards/margin", "accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    assert one[-1]["val/loss"] == pytest.approx(two[-1]["val/loss"], abs=1e-5)
    assert one[-1]["rewards/margin"] != 0  # it did learn something to agree on


def test_dpo_resumes_after_kill(tiny_ckpts, rankings, tmp_path):
    args = ["--data", rankings / "train.jsonl", "--val_data", rankings / "val.jsonl", "--init", tiny_ckpts / "policy.pt",
            *DPO_ARGS, "--epochs", 5, "--eval_every", 5, "--save_every", 2]
    run("dpo.py", *args, "--out", tmp_path / "full")
    step = killed_once("dpo.py", args, tmp_path / "part")
    assert 0 < step < 20
    same_run(tmp_path / "full", tmp_path / "part")


def test_dpo_refuses_empty_data_in_one_sentence(tiny_ckpts, rankings, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    proc = run("dpo.py", "--data", tmp_path / "empty.jsonl", "--init", tiny_ckpts / "policy.pt",
               "--out", tmp_path / "dpo", check=False)
    last = one_sentence(proc)
    assert "empty.jsonl" in last, last
    assert not (tmp_path / "dpo" / "ckpt.pt").exists()


def test_dpo_with_no_data_ranks_the_policys_own_samples(tiny_ckpts, tmp_path):
    # --data task (the default): the built-in task's train prompts, 4 samples each from --init, ranked by the raters
    proc = run("dpo.py", "--init", tiny_ckpts / "policy.pt", "--task_prompts", 40, *DPO_ARGS, "--out", tmp_path / "dpo")
    done = [line for line in proc.stdout.splitlines() if line.startswith("dpo done:")]
    assert done and int(done[0].split()[2]) >= 40, proc.stdout[-2000:]  # rankings read: a rater per prompt, some two
    assert loads_safely(tmp_path / "dpo" / "ckpt.pt")["kind"] == "policy"
