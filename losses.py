"""
Every loss and advantage of the stages, as pure functions on tensors: no model, no data, no
device logic. Each is tested by hand on small examples in tests/test_losses.py.

    masked_mean, masked_whiten          statistics over the valid (mask 1) entries
    aggregate                           a (B, T) loss -> a scalar: per token, per sequence, or Dr. GRPO's constant
    policy_loss, value_loss             PPO's clipped surrogate and clipped value loss
    group_advantages                    GRPO's and RLOO's per-response advantages over K responses to one prompt
    kl_penalty                          the k1 / k2 / k3 per-token KL estimates, for a KL term in the loss
    ranking_loss                        Bradley-Terry over every pair a K-way ranking implies
    dpo_loss, best_nll                  DPO / IPO on those pairs, and RPO's SFT term on the best responses
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels.gae import kl_estimate


# ----------------------------------------------------------------------------- masked statistics

def masked_mean(x, mask, d=None):
    """Mean of x where mask is 1; over all processes when d (a common.Dist under torchrun) is given."""
    total = torch.stack([(x * mask).sum(), mask.sum()]).double()
    if d is not None and d.ddp:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).float()


def masked_whiten(x, mask, d=None):
    """(x - mean) / std over the valid entries (of every process); masked entries become 0."""
    mean = masked_mean(x, mask, d)
    var = masked_mean((x - mean) ** 2, mask, d)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def aggregate(losses, mask, how="token", max_len=None):
    """A (B, T) per-token loss -> one number, three ways (the loss-aggregation question of
    Dr. GRPO, Liu et al. 2025, section 3):
    token:    mean over every valid token of the batch (long responses weigh more);
    sequence: mean over responses of each response's token mean (GRPO's paper: a short response's
              tokens weigh more, which biases towards short right answers and long wrong ones);
    constant: sum over valid tokens / (B * max_len), a normaliser that depends on neither length."""
    if how == "token":
        return masked_mean(losses, mask)
    if how == "sequence":
        per_sequence = (losses * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_sequence[mask.sum(1) > 0].mean() if (mask.sum(1) > 0).any() else per_sequence.sum() * 0
    assert how == "constant" and max_len, (how, max_len)
    return (losses * mask).sum() / (mask.size(0) * max_len)


# ----------------------------------------------------------------------------- PPO

def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange, agg="token", max_len=None):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise. advantages
    (B, T) per token, or (B,) per response (critic-free estimators: the same for every token)."""
    if advantages.dim() < logprobs.dim():
        advantages = advantages[:, None]
    ratio = torch.exp(logprobs - old_logprobs)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    stats = {"ppo/clipfrac": masked_mean(((ratio - 1).abs() > cliprange).float(), mask),
             "ppo/approx_kl": masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask),
             "ppo/ratio_mean": masked_mean(ratio, mask)}
    return aggregate(losses, mask, agg, max_len), stats


def value_loss(values, old_values, returns, mask, cliprange_value):
    """Clipped value loss: the prediction may move at most cliprange_value from the rollout's."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    losses = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(losses, mask), {"val/clipfrac": masked_mean(((values - old_values).abs() > cliprange_value).float(), mask)}


def kl_penalty(logprobs, ref_logprobs, estimator):
    """Per-token estimate of KL(policy || reference) from the sampled tokens, with its gradient
    through logprobs: the KL term of a loss (--kl_in loss). k3 is GRPO's (Shao et al. 2024, eq. 4):
    never negative and of low variance, but as a loss its gradient is not the KL's (k1 in the
    reward is unbiased; see Schulman, "Approximating KL Divergence", 2020)."""
    return kl_estimate(logprobs, ref_logprobs, estimator)


# ----------------------------------------------------------------------------- critic-free advantages

def group_advantages(rewards, group_size, how):
    """Per-response advantages (B,) from rewards (B,), the B responses being B / group_size groups
    of group_size consecutive answers to one prompt:
    grpo: (r - group mean) / group std (Shao et al. 2024, DeepSeekMath, section 4.1);
    rloo: r - the mean of the other K - 1 in its group (Ahmadian et al. 2024, "Back to Basics");
    mean: r - group mean (the baseline of REINFORCE++ with K > 1, before its whitening over the batch).
    Also returns keep (B,) bool: False for the responses of a group whose rewards are all equal,
    which carry no signal (every advantage 0, GRPO's std 0) and are dropped from the loss."""
    K = group_size
    assert K >= 2 and rewards.numel() % K == 0, (rewards.shape, K)
    r = rewards.float().view(-1, K)  # (groups, K)
    mean = r.mean(1, keepdim=True)
    spread = r.std(1, keepdim=True, unbiased=True)
    keep = (r.max(1, keepdim=True).values > r.min(1, keepdim=True).values).expand_as(r)
    if how == "grpo":
        advantages = (r - mean) / (spread + 1e-6)
    elif how == "rloo":
        advantages = (r - mean) * K / (K - 1)  # r - (sum - r) / (K - 1), rearranged
    elif how == "mean":
        advantages = r - mean
    else:
        raise ValueError(f"unknown group estimator {how!r}")
    return torch.where(keep, advantages, 0.0).reshape(-1), keep.reshape(-1)


# ----------------------------------------------------------------------------- rankings (reward model, DPO)

def ranking_loss(rewards, batch):
    """Bradley-Terry over every implied pair, averaged per prompt, then over prompts.
    rewards: (N,) for the batch's sequences in order; batch: [(sequences, pairs, row)]. Returns
    the loss and, for logging, every pair's margin r_better - r_worse."""
    losses, margins, start = [], [], 0
    for seqs, pairs, _ in batch:
        r = rewards[start:start + len(seqs)]
        start += len(seqs)
        better, worse = torch.tensor(pairs, device=rewards.device).T
        margin = r[better] - r[worse]
        losses.append(-F.logsigmoid(margin).mean())
        margins.append(margin.detach())
    return torch.stack(losses).mean(), torch.cat(margins)


def dpo_loss(logratios, batch, beta, loss="sigmoid", label_smoothing=0.0):
    """The DPO loss over every pair each ranking implies, averaged per prompt, then over prompts.
    logratios: (N,) log pi(y) - log ref(y) for the batch's responses in order; batch: [(responses,
    pairs, row)]. With h = logratio(chosen) - logratio(rejected):
        sigmoid (Rafailov et al. 2023, eq. 7):  -log sigmoid(beta h)
        label smoothing eps (conservative DPO): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
        ipo (Azar et al. 2023):                 (h - 1 / (2 beta))^2
    Returns the loss and, per pair, the implicit rewards beta * logratio of the chosen and the
    rejected response, (P,) each."""
    assert loss in ("sigmoid", "ipo"), loss
    losses, chosen, rejected, start = [], [], [], 0
    for examples, pairs, _ in batch:
        r = logratios[start:start + len(examples)]
        start += len(examples)
        better, worse = torch.tensor(pairs, device=logratios.device).T
        h = r[better] - r[worse]
        if loss == "sigmoid":
            pair_losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
        else:
            pair_losses = (h - 1 / (2 * beta)) ** 2
        losses.append(pair_losses.mean())
        chosen.append(beta * r[better].detach())
        rejected.append(beta * r[worse].detach())
    return torch.stack(losses).mean(), torch.cat(chosen), torch.cat(rejected)


def best_nll(logprobs, lengths, batch):
    """The SFT term of RPO (Pang et al. 2024): per-token negative log-likelihood of each prompt's
    best responses (the ranking's first group), averaged per prompt, then over prompts.
    logprobs, lengths: (N,) summed log-prob and token count of the batch's responses in order."""
    nlls, start = [], 0
    for examples, _, row in batch:
        best = torch.tensor(row["ranking"][0], device=logprobs.device) + start
        start += len(examples)
        nlls.append((-logprobs[best] / lengths[best]).mean())
    return torch.stack(nlls).mean()
