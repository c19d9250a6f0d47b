"""GAE (Schulman et al. 2015, "High-Dimensional Continuous Control Using Generalized Advantage
Estimation", eq. 16) over response tokens, and ppo_advantages, which first forms the per-token
RLHF reward (-kl_coef * KL_t, plus the reward model's score on the last token) and then runs GAE.

Every row's mask is a run of ones followed by zeros (the response, then padding). The value after
the last valid token is 0 (the episode ends there) and every output at a masked position is 0.
"""

import torch

from kernels._common import launch_config, tl, triton, use_triton

KL_ESTIMATORS = {"k1": 1, "k2": 2, "k3": 3}  # the kernel takes the estimator as a constexpr int

# One program per row walks its T steps backwards in chunks of BLOCK_T. Each chunk is a round trip
# to memory (its loads, then its scan, then its stores, then the next chunk), so a row in one
# chunk is fastest while the registers hold it. A GPU runs chunks of BLOCK_T steps with 4 warps
# (8 steps a thread) whatever T is: a chunk sized to T would compile again for each new response
# length, and GAE is a few microseconds of a PPO update either way. MINRLHF_AUTOTUNE=1 times
# CONFIGS instead (once per kind: GAE or PPO). The interpreter, whose scan is a Python loop over
# the lanes, uses min(INTERPRET_BLOCK_T, next power of 2 >= T).
CONFIGS = [triton.Config({"BLOCK_T": block}, num_warps=warps)
           for block, warps in ((2048, 8), (4096, 16), (2048, 16), (1024, 4), (1024, 8),
                                (512, 4), (256, 2), (128, 1), (64, 1))]
BLOCK_T = 1024
INTERPRET_BLOCK_T = 1024


def _gpu_config(args):
    return {"BLOCK_T": BLOCK_T, "num_warps": max(1, min(16, BLOCK_T // 256)), "num_stages": 1}


def _interpret_config(args):
    return {"BLOCK_T": min(INTERPRET_BLOCK_T, max(16, triton.next_power_of_2(args["T"])))}


@triton.jit
def _compose(decay_later, adv_later, decay, delta):
    # One scan element is the map A -> delta + decay * A (decay = gamma * lam), taking A_{t+1} to
    # A_t. Composing them is associative, so a parallel scan computes every A_t at once (Blelloch
    # 1990, "Prefix Sums and Their Applications", section 1.4: linear recurrences). The scan runs
    # forward over reversed time, so the left argument is the steps after t already composed.
    # (tl.associative_scan's reverse=True would let the lanes hold time forwards, but it has
    # returned wrong results for combine functions that do not commute: triton-lang/triton#4362.)
    return decay_later * decay, delta + decay * adv_later


@launch_config(CONFIGS, key=["PPO"], gpu=_gpu_config, interpret=_interpret_config)
# T and the addresses change with the batch: not specialised on (an int or address divisible by
# 16, an int equal to 1), so that a new batch does not compile the kernel again. The loads are
# one step at a time either way (lane i holds step end - i).
@triton.jit(do_not_specialize=["rewards_ptr", "values_ptr", "mask_ptr", "scores_ptr",
                               "logprobs_ptr", "ref_logprobs_ptr", "advantages_ptr",
                               "returns_ptr", "kl_ptr", "T"])
def _gae_kernel(rewards_ptr, values_ptr, mask_ptr, scores_ptr, logprobs_ptr, ref_logprobs_ptr,
                advantages_ptr, returns_ptr, kl_ptr, T, gamma, lam, kl_coef,
                PPO: tl.constexpr, KL_ESTIMATOR: tl.constexpr, BLOCK_T: tl.constexpr):
    # One program per row, walking its T steps backwards in chunks of BLOCK_T; in a chunk, lane i
    # holds time step (chunk end - i), so that the scan meets later steps first. Reads the mask,
    # values and rewards (PPO: logprobs and ref_logprobs instead of rewards, and a score per
    # row) and writes advantages and returns (PPO: and kl): 5 (6) numbers per step. The t + 1
    # loads hit the cache lines just read.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    n_chunks = tl.cdiv(T, BLOCK_T)
    decay = tl.full((BLOCK_T,), gamma * lam, tl.float32)
    if PPO:
        score = tl.load(scores_ptr + row).to(tl.float32)
    next_advantage = 0.0  # A_{t+1} for the step after the chunk: 0 after the end of the row
    for chunk in range(n_chunks):
        t = (n_chunks - chunk) * BLOCK_T - 1 - offs
        in_row = t < T
        has_next = t + 1 < T
        idx = row * T + t
        valid = tl.load(mask_ptr + idx, mask=in_row, other=0) != 0
        next_valid = tl.load(mask_ptr + idx + 1, mask=has_next, other=0) != 0
        # V is 0 at masked steps, so V_{t+1} = 0 after the last valid token
        values = tl.load(values_ptr + idx, mask=in_row, other=0.0).to(tl.float32)
        values = tl.where(valid, values, 0.0)
        next_values = tl.load(values_ptr + idx + 1, mask=has_next, other=0.0).to(tl.float32)
        next_values = tl.where(next_valid, next_values, 0.0)
        if PPO:
            # log r = ref_logprobs - logprobs; the estimators of Schulman's note on KL
            log_ratio = (tl.load(ref_logprobs_ptr + idx, mask=in_row, other=0.0).to(tl.float32)
                         - tl.load(logprobs_ptr + idx, mask=in_row, other=0.0).to(tl.float32))
            if KL_ESTIMATOR == 1:
                kl = -log_ratio
            elif KL_ESTIMATOR == 2:
                kl = log_ratio * log_ratio / 2
            else:
                kl = (tl.exp(log_ratio) - 1) - log_ratio
            kl = tl.where(valid, kl, 0.0)
            tl.store(kl_ptr + idx, kl, mask=in_row)
            # the score lands on the last valid token: valid, and the next one is not
            rewards = -kl_coef * kl + tl.where(valid & ~next_valid, score, 0.0)
        else:
            rewards = tl.load(rewards_ptr + idx, mask=in_row, other=0.0).to(tl.float32)
            rewards = tl.where(valid, rewards, 0.0)
        delta = rewards + gamma * next_values - values
        # adv is A_t as if A were 0 after the chunk; decay_prod the product of the decays from t
        # to the chunk's end, which carries A from the chunk after it
        decay_prod, adv = tl.associative_scan((decay, delta), 0, _compose)
        advantages = adv + decay_prod * next_advantage
        tl.store(advantages_ptr + idx, tl.where(valid, advantages, 0.0), mask=in_row)
        tl.store(returns_ptr + idx, tl.where(valid, advantages + values, 0.0), mask=in_row)
        # the chunk's first time step sits in its last lane
        next_advantage = tl.sum(tl.where(offs == BLOCK_T - 1, advantages, 0.0), axis=0)


def _launch(values, mask, *, gamma, lam, rewards=None, scores=None, logprobs=None,
            ref_logprobs=None, kl_coef=0.0, kl_estimator="k1"):
    """GAE on (B, T) inputs -> advantages, returns, kl. Given scores, logprobs and ref_logprobs
    instead of rewards, forms the PPO rewards in the same launch and also fills kl."""
    ppo = rewards is None
    B, T = values.shape
    advantages = torch.empty(B, T, device=values.device)
    returns = torch.empty(B, T, device=values.device)
    if ppo:
        _check_kl_estimator(kl_estimator)
        kl = torch.empty(B, T, device=values.device)
        rewards = values  # not read when PPO; the kernel still takes a pointer
    else:
        scores = logprobs = ref_logprobs = kl = values  # not read when not PPO
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes; Triton loads uint8 more portably than bool
    if B * T > 0:
        _gae_kernel[(B,)](rewards.contiguous(), values.contiguous(), mask.contiguous(),
                          scores.contiguous(), logprobs.contiguous(), ref_logprobs.contiguous(),
                          advantages, returns, kl, T, float(gamma), float(lam), float(kl_coef),
                          PPO=ppo, KL_ESTIMATOR=KL_ESTIMATORS[kl_estimator])
    return advantages, returns, kl


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


def gae_doubling_ref(rewards, values, mask, *, gamma, lam):
    """gae_ref without the Python loop over T, for the benchmark: the same deltas, then
    A_t = sum_k (gamma lam)^k delta_{t+k} in log2(T) steps of recursive doubling (Hillis & Steele
    1986): after the step with shift s, each A_t holds the 2s terms from t on. Reads and writes
    (B, T) about 3 log2(T) times, against about 10 T small kernel launches for the loop."""
    mask = mask.bool()
    rewards = torch.where(mask, rewards.float(), 0.0)
    values = torch.where(mask, values.float(), 0.0)
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))  # 0 after the last step
    advantages = rewards + gamma * next_values - values  # (B, T) delta_t
    decay, shift = gamma * lam, 1
    while shift < advantages.shape[1]:
        advantages = advantages + decay * torch.nn.functional.pad(advantages[:, shift:], (0, shift))
        decay, shift = decay * decay, 2 * shift
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
    _check_kl_estimator(kl_estimator)
    return (log_ratio.exp() - 1) - log_ratio


def _check_kl_estimator(kl_estimator):
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be 'k1', 'k2' or 'k3', not {kl_estimator!r}")


def ppo_advantages_ref(scores, logprobs, ref_logprobs, values, mask, *, kl_coef, gamma, lam,
                       kl_estimator="k1", gae_fn=gae_ref):
    """Reference. scores (B,), logprobs, ref_logprobs, values, mask (B, T)
    -> advantages, returns, kl (B, T) fp32, kl being the per-token estimate (0 where masked).
    gae_fn: the GAE to run (the benchmark also times it with gae_doubling_ref)."""
    mask = mask.bool()
    kl = torch.where(mask, kl_estimate(logprobs, ref_logprobs, kl_estimator), 0.0)  # (B, T)
    rewards = -kl_coef * kl
    # the reward model's score lands on the last valid token; an all-masked row gets none
    lengths = mask.sum(1)  # (B,)
    last = (lengths - 1).clamp(min=0)
    rows = torch.arange(len(rewards), device=rewards.device)
    rewards[rows, last] += torch.where(lengths > 0, scores.float(), 0.0)
    advantages, returns = gae_fn(rewards, values, mask, gamma=gamma, lam=lam)
    return advantages, returns, kl


def gae(rewards, values, mask, *, gamma, lam):
    """Advantages and returns (B, T) fp32 by GAE; see gae_ref for the recurrence."""
    if not use_triton(rewards):
        return gae_ref(rewards, values, mask, gamma=gamma, lam=lam)
    advantages, returns, _ = _launch(values, mask, gamma=gamma, lam=lam, rewards=rewards)
    return advantages, returns


def ppo_advantages(scores, logprobs, ref_logprobs, values, mask, *, kl_coef, gamma, lam,
                   kl_estimator="k1"):
    """(advantages, returns, kl) for PPO, all (B, T) fp32; see ppo_advantages_ref."""
    if not use_triton(logprobs):
        return ppo_advantages_ref(scores, logprobs, ref_logprobs, values, mask, kl_coef=kl_coef,
                                  gamma=gamma, lam=lam, kl_estimator=kl_estimator)
    return _launch(values, mask, gamma=gamma, lam=lam, scores=scores, logprobs=logprobs,
                   ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_estimator=kl_estimator)
