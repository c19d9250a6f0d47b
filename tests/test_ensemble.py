"""Over-optimisation, resisted: reward-model ensembles scored with an uncertainty penalty, and PPO
watching held-out prompts (eval/*), keeping the best checkpoint and stopping past --max_kl."""

import json
import os

import pytest
import torch

import common
import scoring
from common import load_checkpoint
from data import task
from test_stages import SFT_ARGS, metrics, one_sentence, run, tiny_ckpts, write_rankings  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def rankings(tmp_path_factory):
    d = tmp_path_factory.mktemp("rankings")
    write_rankings(d / "rankings.jsonl", task.prompts("train")[:24])
    write_rankings(d / "val.jsonl", task.prompts("val")[:8], seed=1)
    run("sft.py", *SFT_ARGS, "--out", d / "sft")
    return d


def reward_args(d):
    return ["--data", d / "rankings.jsonl", "--val_data", d / "val.jsonl", "--init", d / "sft" / "ckpt.pt",
            "--batch_size", 8, "--epochs", 1, "--normalize_prompts", 8]


def test_ensemble_members_side_by_side_and_member_zero_is_the_plain_model(rankings, tmp_path):
    run("reward.py", *reward_args(rankings), "--out", tmp_path / "one")
    run("reward.py", *reward_args(rankings), "--ensemble", 3, "--bootstrap", "true", "--out", tmp_path / "three")
    run("reward.py", *reward_args(rankings), "--ensemble", 2, "--out", tmp_path / "two")
    members = scoring.load_ensemble(str(tmp_path / "three"))
    assert len(members) == 3 and len(scoring.load_ensemble(str(tmp_path / "one" / "ckpt.pt"))) == 1
    heads = [m.score.weight for m in members]
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])  # own seeds
    # without --bootstrap, member 0 is exactly what a single run trains
    plain, first = load_checkpoint(str(tmp_path / "one")), load_checkpoint(str(tmp_path / "two"))
    assert all(torch.equal(plain["model"][k], first["model"][k]) for k in plain["model"])
    assert first["ensemble"] == 2 and os.path.exists(tmp_path / "two" / "member1" / "metrics.jsonl")
    os.remove(tmp_path / "two" / "member1" / "ckpt.pt")  # a member missing: refused, naming it
    with pytest.raises(common.CheckpointError, match="member1"):
        scoring.load_ensemble(str(tmp_path / "two"))


def ppo(tiny_ckpts, out, *args, check=True):
    return run("ppo.py", "--init", tiny_ckpts / "policy.pt", "--updates", 3, "--batch_size", 8, "--mini_batch_size", 4,
               "--max_new_tokens", 8, "--eval_n", 8, "--eval_every", 1, *args, "--out", out, check=check)


def test_one_member_ensemble_is_a_plain_reward_model(tiny_ckpts, tmp_path):
    # a single reward model has no spread, so the penalty changes nothing
    ppo(tiny_ckpts, tmp_path / "plain", "--reward", tiny_ckpts / "reward.pt")
    ppo(tiny_ckpts, tmp_path / "penalised", "--reward", tiny_ckpts / "reward.pt", "--uncertainty_coef", 5)
    a, b = (load_checkpoint(str(tmp_path / x)) for x in ("plain", "penalised"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("nproc", [1, 2])
def test_ppo_scores_with_an_ensemble_and_watches_held_out_prompts(rankings, tiny_ckpts, tmp_path, nproc):
    run("reward.py", *reward_args(rankings), "--ensemble", 2, "--out", tmp_path / "rm")
    out = tmp_path / "ppo"
    run("ppo.py", "--init", rankings / "sft" / "ckpt.pt", "--reward", tmp_path / "rm", "--uncertainty_coef", 1,
        "--keep_best", "true", "--updates", 3, "--batch_size", 8, "--mini_batch_size", 4, "--max_new_tokens", 8,
        "--eval_n", 8, "--eval_every", 1, "--log_samples_every", 1, "--out", out, nproc=nproc)
    rows = metrics(out)
    train = [r for r in rows if "ppo/policy_loss" in r]
    watched = [r for r in rows if "eval/kl_exact" in r]
    assert all(r["objective/rm_spread"] > 0 for r in train)
    # the penalised score is what PPO gets: mean minus the spread
    assert all(r["objective/score"] == pytest.approx(r["objective/rm_score"] - r["objective/rm_spread"], abs=1e-5) for r in train)
    assert [r["step"] for r in watched] == [0, 1, 2, 3]  # the SFT policy first, then every update
    assert watched[0]["eval/kl_exact"] == pytest.approx(0, abs=1e-5) and all(r["eval/rm_spread"] > 0 for r in watched)
    assert {"eval/score", "eval/resp_len", "eval/gold"} <= set(watched[0])
    best = load_checkpoint(str(out / "best.pt"))
    assert best["eval/score"] == max(r["eval/score"] for r in watched)
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert {s["step"] for s in samples} == {1, 2, 3} and {"prompt", "response", "score", "kl", "gold"} <= set(samples[0])


def test_spread_is_measured_against_the_references_response(tiny_ckpts, tmp_path):
    # two members that differ only by a constant: the same preferences, so no spread against the
    # reference's response; their raw scores differ by 1 everywhere (--spread_vs_ref false)
    ckpt = load_checkpoint(str(tiny_ckpts / "reward.pt"))
    torch.save({**ckpt, "ensemble": 2}, tmp_path / "ckpt.pt")
    ckpt["model"]["score.bias"] += 1.0
    os.makedirs(tmp_path / "member1")
    torch.save(ckpt, tmp_path / "member1" / "ckpt.pt")
    for vs_ref, spread in [("true", 0.0), ("false", 0.5)]:
        out = tmp_path / f"ppo_{vs_ref}"
        ppo(tiny_ckpts, out, "--reward", tmp_path, "--uncertainty_coef", 1, "--spread_vs_ref", vs_ref)
        rows = metrics(out)
        assert all(r["objective/rm_spread"] == pytest.approx(spread, abs=1e-5) for r in rows if "ppo/policy_loss" in r)
        assert all(r["eval/rm_spread"] == pytest.approx(spread, abs=1e-5) for r in rows if "eval/kl_exact" in r)


def test_keep_best_refuses_a_single_reward_model(tiny_ckpts, tmp_path):
    proc = ppo(tiny_ckpts, tmp_path / "ppo", "--reward", tiny_ckpts / "reward.pt", "--keep_best", "true", check=False)
    last = one_sentence(proc)
    assert "--keep_best" in last and "single reward model" in last and "ensemble" in last, last


def test_max_kl_stops_the_run_and_says_why(tiny_ckpts, tmp_path):
    proc = ppo(tiny_ckpts, tmp_path / "ppo", "--reward", tiny_ckpts / "reward.pt", "--max_kl", 1e-6, "--lr", 0.01)
    assert "stopped at update 1: the held-out KL per response passed --max_kl" in proc.stdout
    assert "the last checkpoint is" in proc.stdout
    assert load_checkpoint(str(tmp_path / "ppo"))["step"] == 1


def test_reward_with_too_few_rankings_says_what_to_do(rankings, tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(open(rankings / "rankings.jsonl").readline())
    proc = run("reward.py", "--data", path, "--init", rankings / "sft" / "ckpt.pt", "--out", tmp_path / "rm", check=False)
    last = one_sentence(proc)
    assert str(path) in last and "--val_data" in last and "add rankings" in last, last


SCRIPTED_JUDGE = '''
import os
SCRIPT = [0.1, 0.5, 0.3, 0.9, 0.2]  # the held-out score at updates 0, 1, 2, 3, 4
COUNTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls")


def scripted(prompts, responses):
    calls = int(open(COUNTER).read()) if os.path.exists(COUNTER) else 0
    open(COUNTER, "w").write(str(calls + 1))
    return [SCRIPT[calls]] * len(responses)


def length(prompts, responses):
    return [-abs(len(r.split()) - 5) / 5 for r in responses]
'''


def test_keep_best_follows_the_judge_on_a_scripted_sequence(tiny_ckpts, tmp_path):
    pytest.importorskip("rate")
    judge = tmp_path / "judge.py"
    judge.write_text(SCRIPTED_JUDGE)
    out = tmp_path / "ppo"
    # a single reward model is allowed here: the judge, not the reward model, picks the checkpoint
    ppo(tiny_ckpts, out, "--reward", tiny_ckpts / "reward.pt", "--judge", f"{judge}:scripted", "--keep_best", "true",
        "--updates", 4)
    watched = [r for r in metrics(out) if "eval/judge" in r]
    assert [r["eval/judge"] for r in watched] == pytest.approx([0.1, 0.5, 0.3, 0.9, 0.2])
    best = load_checkpoint(str(out / "best.pt"))
    assert best["step"] == 3 and best["eval/judge"] == pytest.approx(0.9)


def test_ppo_from_a_judge_alone(tiny_ckpts, tmp_path):
    pytest.importorskip("rate")
    judge = tmp_path / "judge.py"
    judge.write_text(SCRIPTED_JUDGE)
    out = tmp_path / "ppo"
    ppo(tiny_ckpts, out, "--reward_fn", f"{judge}:length", "--keep_best", "true")
    rows = [r for r in metrics(out) if "ppo/policy_loss" in r]
    assert all(r["objective/score"] == pytest.approx(r["objective/reward_fn"]) for r in rows)
    assert not any("objective/rm_score" in r for r in rows)
    value = load_checkpoint(str(out / "value.pt"))
    policy = load_checkpoint(str(tiny_ckpts / "policy.pt"))
    # the value model is the policy's trunk with a new head (no reward model to start from)
    assert value["model_config"]["head"] == "scalar" and value["model_config"]["n_embd"] == policy["model_config"]["n_embd"]
    assert os.path.exists(out / "best.pt")  # the judge picks the best checkpoint


def test_ensemble_of_trunks_one_member_each(rankings, tmp_path):
    run("sft.py", *SFT_ARGS, "--seed", 1, "--out", tmp_path / "sft1")
    trunks = f"{rankings / 'sft' / 'ckpt.pt'},{tmp_path / 'sft1' / 'ckpt.pt'}"
    args = [a if a != rankings / "sft" / "ckpt.pt" else trunks for a in reward_args(rankings)]
    run("reward.py", *args, "--out", tmp_path / "rm")
    members = scoring.load_ensemble(str(tmp_path / "rm"))
    sft1 = load_checkpoint(str(tmp_path / "sft1"))["model"]
    assert len(members) == 2
    # member 1 started from the second trunk: its embedding moved from there, not from the first's
    moved = [(m.state_dict()["transformer.wpe.weight"] - sft1["transformer.wpe.weight"]).abs().mean() for m in members]
    assert moved[1] < moved[0]
