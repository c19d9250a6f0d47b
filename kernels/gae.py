"""GAE (Schulman et al. 2015, "High-Dimensional Continuous Control Using Generalized Advantage
Estimation", eq. 16) over response tokens, and ppo_advantages, which first forms the per-token
RLHF reward (-kl_coef * KL_t, plus the reward model's score on the last token) and then runs GAE.

Every row's mask is a run of ones followed by zeros (the response, then padding). The value after
the last valid token is 0 (the episode ends there) and every output at a masked position is 0.
"""

import torch

from kernels._common import use_triton


def gae_ref(rewards, values, mask, *, gamma, lam):
    """Reference: the reversed loop over T, as CleanRL writes it. rewards, values, mask (B, T)
    -> advantages, returns (B, T) fp32.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t
    """
    mask = mask.bool()
    rewards = torch.where(mask, rewards.float(), 0.0)
    values = torch.where(mask, values.float(), 0.0)  # so V = 0 after the last valid token
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}; 0 past the end
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages[:, t] = lastgaelam
    advantages = torch.where(mask, advantages, 0.0)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


def kl_estimate(logprobs, ref_logprobs, kl_estimator):
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs, as in
    Schulman's note "Approximating KL Divergence" (2020), with log r = ref_logprobs - logprobs."""
    log_ratio = ref_logprobs.float() - logprobs.float()
    if kl_estimator == "k1":
        return -log_ratio
    if kl_estimator == "k2":
        return log_ratio ** 2 / 2
    if kl_estimator == "k3":
        return (log_ratio.exp() - 1) - log_ratio
    raise ValueError(f"kl_estimator must be 'k1', 'k2' or 'k3', not {kl_estimator!r}")


def ppo_advantages_ref(scores, logprobs, ref_logprobs, values, mask, *, kl_coef, gamma, lam,
                       kl_estimator="k1"):
    """Reference. scores (B,), logprobs, ref_logprobs, values, mask (B, T)
    -> advantages, returns, kl (B, T) fp32, kl being the per-token estimate (0 where masked)."""
    mask = mask.bool()
    kl = torch.where(mask, kl_estimate(logprobs, ref_logprobs, kl_estimator), 0.0)  # (B, T)
    rewards = -kl_coef * kl
    # the reward model's score lands on the last valid token; an all-masked row gets none
    lengths = mask.sum(1)  # (B,)
    last = (lengths - 1).clamp(min=0)
    rows = torch.arange(len(rewards), device=rewards.device)
    rewards[rows, last] += torch.where(lengths > 0, scores.float(), 0.0)
    advantages, returns = gae_ref(rewards, values, mask, gamma=gamma, lam=lam)
    return advantages, returns, kl


def gae(rewards, values, mask, *, gamma, lam):
    """Advantages and returns (B, T) fp32 by GAE; see gae_ref for the recurrence."""
    if not use_triton(rewards):
        return gae_ref(rewards, values, mask, gamma=gamma, lam=lam)
    raise NotImplementedError("the Triton gae kernel is not written yet")


def ppo_advantages(scores, logprobs, ref_logprobs, values, mask, *, kl_coef, gamma, lam,
                   kl_estimator="k1"):
    """(advantages, returns, kl) for PPO, all (B, T) fp32; see ppo_advantages_ref."""
    if not use_triton(logprobs):
        return ppo_advantages_ref(scores, logprobs, ref_logprobs, values, mask, kl_coef=kl_coef,
                                  gamma=gamma, lam=lam, kl_estimator=kl_estimator)
    raise NotImplementedError("the Triton ppo_advantages kernel is not written yet")
