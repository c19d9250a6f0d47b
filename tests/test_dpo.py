"""dpo.py: its losses by hand on a tiny case, then the stage run as a user runs it (one process,
torchrun with two, resumed after a kill) on a tiny random policy, and eval.py taking the result."""

import json
import math

import pytest
import torch

import dpo
from conftest import ROOT  # noqa: F401  (puts the repo root on sys.path)
from data import task
from data.formats import ranking_pairs
from test_resume import killed_once, same_run
from test_stages import loads_safely, metrics, one_sentence, run, tiny_ckpts, write_rankings  # noqa: F401  (a fixture)


def logsig(x):
    return -math.log(1 + math.exp(-x))


# Two prompts: K = 3 with response 0 above the tied 1 and 2 (two pairs), and K = 2 with 1 above 0.
BATCH = [([None] * 3, ranking_pairs([[0], [1, 2]]), {}), ([None] * 2, ranking_pairs([1, 0]), {})]
LOGRATIOS = torch.tensor([2.0, -1.0, 0.5, 0.3, -0.7])  # log pi - log ref of the five responses
H = [[2.0 + 1.0, 2.0 - 0.5], [-0.7 - 0.3]]  # per prompt, h = logratio(chosen) - logratio(rejected) of each pair


def per_prompt(pair_loss):
    return sum(sum(pair_loss(h) for h in hs) / len(hs) for hs in H) / len(H)


@pytest.mark.parametrize("loss,beta,eps,expected", [
    ("sigmoid", 0.1, 0.0, lambda h: -logsig(0.1 * h)),
    ("sigmoid", 0.5, 0.2, lambda h: -0.8 * logsig(0.5 * h) - 0.2 * logsig(-0.5 * h)),
    ("ipo", 0.1, 0.0, lambda h: (h - 1 / (2 * 0.1)) ** 2),
])
def test_dpo_loss_by_hand(loss, beta, eps, expected):
    value, chosen, rejected = dpo.dpo_loss(LOGRATIOS, BATCH, beta, loss, eps)
    assert value.item() == pytest.approx(per_prompt(expected), rel=1e-6)
    # the implicit rewards beta * logratio of each pair's chosen and rejected response
    torch.testing.assert_close(chosen, beta * torch.tensor([2.0, 2.0, -0.7]))
    torch.testing.assert_close(rejected, beta * torch.tensor([-1.0, 0.5, 0.3]))


def test_dpo_loss_each_prompt_weighs_the_same():
    value = dpo.dpo_loss(LOGRATIOS, BATCH, 0.1)[0].item()
    per_pair = sum(-logsig(0.1 * h) for hs in H for h in hs) / 3
    assert value == pytest.approx(per_prompt(lambda h: -logsig(0.1 * h)), rel=1e-6)
    assert abs(value - per_pair) > 1e-3  # the two weightings are told apart


def test_best_nll_is_per_token_on_each_prompts_best_responses():
    logprobs, lengths = torch.tensor([-4.0, -1.0, -9.0, -2.0, -6.0]), torch.tensor([2.0, 1.0, 3.0, 1.0, 3.0])
    batch = [([None] * 3, None, {"ranking": [[0, 2], [1]]}), ([None] * 2, None, {"ranking": [[1], [0]]})]
    assert dpo.best_nll(logprobs, lengths, batch).item() == pytest.approx(((4 / 2 + 9 / 3) / 2 + 6 / 3) / 2)


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
    assert first["val/rewards/chosen"] == 0 and first["val/rewards/rejected"] == 0 and first["val/kl"] == 0
    assert first["val/loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the first batch, too, is scored before any update
    last = rows[-1]
    assert last["val/kl"] > 0 and last["rewards/margin"] > 0 and last["loss"] < math.log(2)
    for key in ("rewards/chosen", "rewards/rejected", "accuracy", "val/accuracy", "val/rewards/margin", "val/gold"):
        assert math.isfinite(last[key]), key
    ckpt = loads_safely(tmp_path / "dpo" / "ckpt.pt")
    assert ckpt["kind"] == "policy" and ckpt["step"] == 4
    # a policy like any other: eval.py scores it against the SFT model it started from
    run("eval.py", "--init", tmp_path / "dpo" / "ckpt.pt", "--compare", tiny_ckpts / "policy.pt",
        "--ref", tiny_ckpts / "policy.pt", "--n", 8, "--max_new_tokens", 8, "--demos", "", "--out", tmp_path / "eval.json")
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["models"][str(tmp_path / "dpo" / "ckpt.pt")]["kl"] > 0 and 0 <= ev["win_rate"] <= 1


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
