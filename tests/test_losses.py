"""The pure functions of losses.py (and scoring's conservative score and gold agreement, rollout's
response mask, ppo's advantages), each checked by hand on small examples: every loss and advantage
the stages train with."""

import math

import pytest
import torch

import ppo
from data.formats import ranking_pairs
from data.tokenizer import encode_rankings, get_tokenizer
from kernels import ppo_advantages
from losses import (aggregate, best_nll, dpo_loss, group_advantages, kl_penalty, masked_mean, masked_whiten,
                    policy_loss, ranking_loss, value_loss)
from rollout import response_mask
from scoring import conservative_score, gold_agreement


def nll(margin):
    """-log sigmoid(margin), written out."""
    return -math.log(1 / (1 + math.exp(-margin)))


# ----------------------------------------------------------------------------- ranking_loss

def test_ranking_loss_by_hand():
    pairs_a = ranking_pairs([[0], [1, 2]])  # K = 3, responses 1 and 2 tied below 0
    pairs_b = ranking_pairs([1, 0])  # K = 2, response 1 better
    assert pairs_a == [(0, 1), (0, 2)] and pairs_b == [(1, 0)]
    batch = [([[1], [2], [3]], pairs_a, {}), ([[4], [5]], pairs_b, {})]
    rewards = torch.tensor([1.0, 0.2, -0.5, 0.3, 0.9])
    loss, margins = ranking_loss(rewards, batch)
    expected = ((nll(1.0 - 0.2) + nll(1.0 + 0.5)) / 2 + nll(0.9 - 0.3)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(margins, torch.tensor([0.8, 1.5, 0.6]))


def test_ranking_ties_make_no_pair():
    assert ranking_pairs([[0, 1]]) == []
    assert sorted(ranking_pairs([[0, 2], [1]])) == [(0, 1), (2, 1)]
    # a ranking that is all one tie is dropped, one with a pair is kept
    enc = get_tokenizer("task")
    rows = [{"prompt": "p", "responses": ["a", "b"], "ranking": [[0, 1]]},
            {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [[0, 1], [2]]}]
    stats = {}
    out = encode_rankings(enc, rows, 64, stats)
    assert stats["dropped"] == 1 and len(out) == 1
    seqs, pairs, _ = out[0]
    assert len(seqs) == 3 and sorted(pairs) == [(0, 2), (1, 2)]
    assert all(s[-1] == enc.eot_token for s in seqs)  # scored on the EOS


def test_ranking_loss_each_prompt_weighs_the_same():
    assert len(ranking_pairs(list(range(9)))) == 36  # a full K = 9 ranking implies 36 pairs
    # K = 9 with response 0 above eight tied ones: 8 pairs, each of margin 1; K = 2: one pair of margin 3
    k9 = ranking_pairs([[0], list(range(1, 9))])
    batch = [([[0]] * 9, k9, {}), ([[0]] * 2, [(0, 1)], {})]
    rewards = torch.tensor([1.0] + [0.0] * 8 + [0.0, -3.0])
    loss, _ = ranking_loss(rewards, batch)
    per_prompt = (nll(1.0) + nll(3.0)) / 2
    per_pair = (8 * nll(1.0) + nll(3.0)) / 9
    assert loss.item() == pytest.approx(per_prompt, abs=1e-6)
    assert abs(per_prompt - per_pair) > 0.1  # the two weightings are told apart


# ----------------------------------------------------------------------------- PPO

def test_response_mask():
    response = torch.tensor([[5, 3, 7, 3], [5, 6, 7, 8], [3, 1, 1, 1], [5, 6, 7, 3]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(response_mask(response, 3), expected)


def test_masked_whiten():
    torch.manual_seed(0)
    x = torch.randn(4, 7) * 3 + 5
    mask = (torch.rand(4, 7) > 0.3).float()
    w = masked_whiten(x, mask)
    valid = w[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert valid.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask.bool()] == 0).all()
    # what sits under the mask does not matter
    torch.testing.assert_close(masked_whiten(torch.where(mask.bool(), x, 1e6), mask), w)
    assert masked_mean(x, mask).item() == pytest.approx(x[mask.bool()].mean().item(), abs=1e-5)


def test_policy_loss_clipping():
    eps = 0.2
    # one token each: ratio 1.5 and 0.5, advantage +1 and -1
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    expected = [-1.2,  # A > 0, ratio above 1 + eps: clipped, no more credit
                1.5,  # A < 0, ratio above: not clipped (pessimistic side)
                -0.5,  # A > 0, ratio below 1 - eps: not clipped
                0.8,  # A < 0, ratio below: clipped
                -1.1]  # inside the range: plain ratio * A
    has_grad = [False, True, True, False, True]
    old = torch.zeros(5)
    for i in range(5):
        logprobs = ratio[i:i + 1].log().clone().requires_grad_(True)
        loss, stats = policy_loss(logprobs, old[i:i + 1], adv[i:i + 1], torch.ones(1), eps)
        assert loss.item() == pytest.approx(expected[i], abs=1e-6), i
        loss.backward()
        assert (logprobs.grad.abs().item() > 0) == has_grad[i], i
    loss, stats = policy_loss(ratio.log(), old, adv, torch.tensor([1.0, 1, 1, 1, 0]), eps)
    assert loss.item() == pytest.approx(sum(expected[:4]) / 4, abs=1e-6)  # masked token left out
    assert stats["ppo/clipfrac"].item() == pytest.approx(1.0)
    assert stats["ppo/ratio_mean"].item() == pytest.approx(1.0)


def test_value_loss_clipping():
    old = torch.zeros(3)
    values = torch.tensor([1.0, 0.1, 1.0], requires_grad=True)
    returns = torch.tensor([1.0, 1.0, 0.0])
    # 1: moved 1.0 > 0.2 towards the return: clipped error (0.2 - 1)^2 = 0.64 wins over 0
    # 2: moved 0.1, inside the clip: (0.1 - 1)^2 = 0.81
    # 3: moved 1.0 away from the return: unclipped 1.0 wins over clipped 0.04
    per_token = [0.64, 0.81, 1.0]
    for i in range(3):
        loss, stats = value_loss(values[i:i + 1], old[i:i + 1], returns[i:i + 1], torch.ones(1), 0.2)
        assert loss.item() == pytest.approx(0.5 * per_token[i], abs=1e-6), i
    loss, stats = value_loss(values, old, returns, torch.ones(3), 0.2)
    assert loss.item() == pytest.approx(0.5 * sum(per_token) / 3, abs=1e-6)
    assert stats["val/clipfrac"].item() == pytest.approx(2 / 3)
    loss.backward()
    assert values.grad[0].item() == 0 and values.grad[1].item() != 0 and values.grad[2].item() != 0


# ----------------------------------------------------------------------------- DPO (dpo.py)

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
    value, chosen, rejected = dpo_loss(LOGRATIOS, BATCH, beta, loss, eps)
    assert value.item() == pytest.approx(per_prompt(expected), rel=1e-6)
    # the implicit rewards beta * logratio of each pair's chosen and rejected response
    torch.testing.assert_close(chosen, beta * torch.tensor([2.0, 2.0, -0.7]))
    torch.testing.assert_close(rejected, beta * torch.tensor([-1.0, 0.5, 0.3]))


def test_dpo_loss_each_prompt_weighs_the_same():
    value = dpo_loss(LOGRATIOS, BATCH, 0.1)[0].item()
    per_pair = sum(-logsig(0.1 * h) for hs in H for h in hs) / 3
    assert value == pytest.approx(per_prompt(lambda h: -logsig(0.1 * h)), rel=1e-6)
    assert abs(value - per_pair) > 1e-3  # the two weightings are told apart


def test_best_nll_is_per_token_on_each_prompts_best_responses():
    logprobs, lengths = torch.tensor([-4.0, -1.0, -9.0, -2.0, -6.0]), torch.tensor([2.0, 1.0, 3.0, 1.0, 3.0])
    batch = [([None] * 3, None, {"ranking": [[0, 2], [1]]}), ([None] * 2, None, {"ranking": [[1], [0]]})]
    assert best_nll(logprobs, lengths, batch).item() == pytest.approx(((4 / 2 + 9 / 3) / 2 + 6 / 3) / 2)


# ----------------------------------------------------------------------------- ensembles (scoring.py)

def test_conservative_score_by_hand():
    scores = torch.tensor([[1.0, 4.0], [2.0, 4.0], [3.0, 4.0]])  # 3 members, 2 responses
    score, spread = conservative_score(scores, 1.5)
    std = (2 / 3) ** 0.5  # members 1, 2, 3 around their mean 2: sqrt((1 + 0 + 1) / 3)
    torch.testing.assert_close(spread, torch.tensor([std, 0.0]))
    torch.testing.assert_close(score, torch.tensor([2.0 - 1.5 * std, 4.0]))
    one, zero = conservative_score(scores[:1], 10.0)  # one member: its own score, whatever the coefficient
    assert torch.equal(one, scores[0]) and torch.equal(zero, torch.zeros(2))
    # against a baseline (each member's score of another response to the same prompt): members
    # that differ by a constant per prompt agree; only disagreement on the difference counts
    baseline = torch.tensor([[0.0, 1.0], [1.0, 2.0], [2.0, 0.0]])
    score, spread = conservative_score(scores, 1.5, baseline)  # differences [1, 3], [1, 2], [1, 4]
    torch.testing.assert_close(spread, torch.tensor([0.0, std]))
    torch.testing.assert_close(score, torch.tensor([2.0, 4.0 - 1.5 * std]))


# ----------------------------------------------------------------------------- critic-free estimators

def test_group_advantages_by_hand():
    # two groups of K = 3: rewards [1, 2, 3] and [5, 5, 5] (no spread: dropped)
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv, keep = group_advantages(rewards, 3, "grpo")
    std = 1.0  # sample std of [1, 2, 3]
    torch.testing.assert_close(adv, torch.tensor([-1 / (std + 1e-6), 0.0, 1 / (std + 1e-6), 0.0, 0.0, 0.0]))
    assert keep.tolist() == [True, True, True, False, False, False]
    adv, keep = group_advantages(rewards, 3, "rloo")
    # r minus the mean of the other two: 1 - 2.5, 2 - 2, 3 - 1.5
    torch.testing.assert_close(adv, torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]))
    adv, keep = group_advantages(torch.tensor([0.0, 4.0]), 2, "rloo")
    torch.testing.assert_close(adv, torch.tensor([-4.0, 4.0]))
    adv, keep = group_advantages(rewards, 3, "mean")  # r - group mean (REINFORCE++ with groups)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError):
        group_advantages(rewards, 3, "gae")


def test_reinforce_pp_returns_are_the_kl_shaped_reward_to_go():
    # no critic and lam = 1: each token's advantage is the sum of the rewards from it to the end
    scores = torch.tensor([2.0])
    logprobs, ref_logprobs = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -1.0, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, returns, kl = ppo_advantages(scores, logprobs, ref_logprobs, torch.zeros(1, 3), mask, kl_coef=0.1, gamma=1.0,
                                      lam=1.0, kl_estimator="k1")
    r = [-0.1 * 0.5, -0.1 * -1.0 + 2.0]  # k1 = logprobs - ref_logprobs = [0.5, -1.0]; the score on the last token
    torch.testing.assert_close(adv, torch.tensor([[r[0] + r[1], r[1], 0.0]]))
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0]]))


def test_reinforce_pp_with_groups_takes_each_groups_mean_score_first():
    # REINFORCE++ with K > 1: a prompt's own offset (free under a ranking loss) must not reach the advantages
    cfg = ppo.Config(advantage="reinforce_pp", group_size=2, kl_coef=0.0)
    cfg.check()
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    r = {"scores": torch.tensor([10.0, 12.0, -3.0, -5.0]), "old_logprobs": -torch.ones(4, 2), "ref_logprobs": -torch.ones(4, 2)}
    out = ppo.advantages(cfg, None, r, mask, kl_coef=0.0)
    centred = torch.tensor([[-1.0, -1.0], [1.0, 0.0], [1.0, 1.0], [-1.0, -1.0]])  # score less its pair's mean, to go
    torch.testing.assert_close(out["returns"], centred)
    torch.testing.assert_close(out["advantages"], masked_whiten(centred, mask))
    # without groups (K = 1) the offsets stay, and whitening alone cannot remove them
    cfg = ppo.Config(advantage="reinforce_pp", group_size=1, kl_coef=0.0)
    cfg.check()
    out = ppo.advantages(cfg, None, {k: v[[0, 2]] for k, v in r.items()}, mask[[0, 2]], kl_coef=0.0)
    torch.testing.assert_close(out["returns"], torch.tensor([[10.0, 10.0], [-3.0, -3.0]]))


def test_rl_batch_and_lr_defaults_depend_on_the_estimator():
    # --batch_size 0, --group_size 0 and --lr 0 pick the suite's defaults: 64 prompts x 1 response
    # for gae, 32 prompts x 4 for the critic-free estimators, GRPO at twice the learning rate; what
    # the command line gives stays
    want = {"gae": (64, 1, 1e-4), "grpo": (128, 4, 2e-4), "rloo": (128, 4, 1e-4), "reinforce_pp": (128, 4, 1e-4)}
    for advantage, (batch, group, lr) in want.items():
        cfg = ppo.Config(advantage=advantage)
        cfg.check()
        assert (cfg.batch_size, cfg.group_size, cfg.lr) == (batch, group, lr), advantage
    cfg = ppo.Config(advantage="grpo", batch_size=32, lr=5e-5)
    cfg.check()
    assert (cfg.batch_size, cfg.group_size, cfg.lr) == (32, 4, 5e-5)


def test_kl_penalty_estimators():
    logprobs, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    log_r = ref - logprobs  # [-0.5, 1.0]
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k1"), -log_r)
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k2"), log_r ** 2 / 2)
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k3"), log_r.exp() - 1 - log_r)
    assert (kl_penalty(logprobs, ref, "k3") >= 0).all()
    lp = logprobs.clone().requires_grad_(True)
    kl_penalty(lp, ref, "k3").sum().backward()
    torch.testing.assert_close(lp.grad, 1 - log_r.exp())  # d/dlp of exp(ref - lp) - 1 - (ref - lp)


def test_aggregate_token_sequence_constant():
    losses = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert aggregate(losses, mask, "token").item() == pytest.approx(8 / 5)  # the long response weighs 4 of 5
    assert aggregate(losses, mask, "sequence").item() == pytest.approx((1 + 4) / 2)  # each response alike
    assert aggregate(losses, mask, "constant", max_len=8).item() == pytest.approx(8 / (2 * 8))  # Dr. GRPO
    # a dropped response (all-masked row) counts in no mean
    mask[1] = 0
    assert aggregate(losses, mask, "sequence").item() == pytest.approx(1.0)


def test_policy_loss_takes_a_per_response_advantage():
    logprobs = torch.log(torch.tensor([[1.1, 0.9], [1.0, 1.0]]))
    per_response = policy_loss(logprobs, torch.zeros(2, 2), torch.tensor([1.0, -2.0]), torch.ones(2, 2), 0.2)[0]
    per_token = policy_loss(logprobs, torch.zeros(2, 2), torch.tensor([[1.0, 1.0], [-2.0, -2.0]]), torch.ones(2, 2), 0.2)[0]
    assert per_response.item() == pytest.approx(per_token.item()) and per_token.item() == pytest.approx((-1.1 - 0.9 + 4) / 4)


def test_gold_agreement_counts_only_pairs_that_gold_orders():
    # two rankings of 3 and 2 responses; the gold ties b and c in the first, so that pair never counts
    class Gold:
        def gold_score(self, prompt, response):
            return {"a": 1.0, "b": 2.0, "c": 2.0, "d": 0.0, "e": 5.0}[response]
    rankings = [([[1], [2], [3]], [], {"prompt": "p", "responses": ["a", "b", "c"]}),
                ([[4], [5]], [], {"prompt": "q", "responses": ["d", "e"]})]
    scores = torch.tensor([0.5, 0.1, 0.9, 1.0, 0.0])  # a<b wrong, a<c right; d<e wrong
    assert gold_agreement(scores, rankings, Gold()) == (1, 3)
