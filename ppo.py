"""
Stage 3, PPO: make the SFT policy score higher under the reward model while a KL penalty keeps
it near the frozen SFT reference (InstructGPT, Ouyang et al. 2022, section 3.5; the defaults
follow "The N+ Implementation Details of RLHF with PPO", Huang et al. 2024).

Each update: 1. sample prompts; 2. generate responses; 3. score them with the reward model and
run the policy, the reference and the value model over the finished rollout; 4. per-token
rewards = -beta * KL_t, plus the score on the last token; 5. GAE advantages, whitened;
6. several epochs of clipped policy and value losses over minibatches; 7. adapt beta;
8. every --eval_every updates, watch held-out prompts.

    python ppo.py                            # built-in task: out/sft policy, out/reward reward model
    python ppo.py --init out/sft/ckpt.pt --reward out/reward/ckpt.pt --data prompts.jsonl --out out/ppo
    python ppo.py --reward_fn judges/question.py:score --data prompts.jsonl   # a judge function, no reward model
    python ppo.py --reward out/reward3 --uncertainty_coef 1 --keep_best true    # an ensemble, conservative
    torchrun --nproc_per_node=2 ppo.py

Data: prompts JSONL ({prompt}; any file with a prompt field, HH-RLHF too), or "task".

The score: a reward model (--reward), or an ensemble of them (reward.py --ensemble K), whose
score is their mean minus --uncertainty_coef times their spread (Coste et al. 2023); the spread
is over each member's score minus its score of the reference's own response to the same prompt,
since a ranking loss leaves every member free to add its own constant per prompt
(--spread_vs_ref; it costs one more generation per rollout, by the reference); and/or a
judge function (--reward_fn FILE.py:fn, weighted by --reward_fn_weight; without a reward model
the value model starts from the policy's trunk with a new head).

Over-optimisation shows on prompts PPO never trains on: every --eval_every updates the policy
answers --eval_prompts (default: --eval_n prompts held out of --data) and their reward-model
score, ensemble spread, KL to the reference, length (and judge or gold score) are logged as
eval/*. --keep_best true keeps the checkpoint with the best held-out score in OUT/best.pt, and
--max_kl stops a run that drifts too far.
"""

import hashlib
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import CheckpointError, ConfigError, Logger, all_reduce_mean, autocast, cleanup, compute_dtype, done_line, \
    keep_rows, load_model, make_optimizer, parse_config, print0, resume_checkpoint, rng_states, run_main, \
    save_checkpoint, set_rng_states, setup
from data import task
from data.formats import DataError, load_prompts
from data.tokenizer import get_tokenizer
from kernels import kl_full, ppo_advantages
from model import Sampler
from reward import conservative_score, ensemble_scores, load_ensemble
from sample import decode, encode_prompts, generate


@dataclass
class Config:
    data: str = "task"  # prompts JSONL (.gz too), or "task" for the built-in task's train prompts
    init: str = "out/sft/ckpt.pt"  # SFT checkpoint: the policy starts here and stays the frozen reference
    ref: str = ""  # the frozen reference for the KL penalty; default: --init (a later round starts --init from its last policy and keeps SFT here)
    reward: str = ""  # reward model checkpoint (an ensemble's ckpt.pt loads every member); default out/reward/ckpt.pt, none with --reward_fn alone
    reward_fn: str = ""  # a judge FILE.py:fn(prompts, responses) -> [float] that scores responses, instead of or beside --reward
    reward_fn_weight: float = 1.0  # weight of --reward_fn's score when it is added to a reward model's
    uncertainty_coef: float = 0.0  # with an ensemble: score = mean - coef * std over the members (0: the plain mean)
    spread_vs_ref: bool = True  # with an ensemble: the std of each member's score minus its score of the reference's own response to the prompt (a ranking loss leaves a constant per prompt free; false: the std of the scores themselves)
    out: str = "out/ppo"  # output directory: ckpt.pt (policy), value.pt, metrics.jsonl, samples.jsonl, best.pt
    updates: int = 120  # rollout + optimisation rounds
    batch_size: int = 64  # prompts per rollout, over all processes
    mini_batch_size: int = 16  # sequences per PPO gradient step, over all processes
    ppo_epochs: int = 4  # passes over each rollout
    lr: float = 1e-4  # Adam learning rate for policy and value model
    max_new_tokens: int = 40  # longest response; one that ends without EOS is penalised
    temperature: float = 1.0  # sampling temperature, also used for every log-prob (N+ details)
    cuda_graph: bool = True  # on GPU, replay the decode step as a CUDA graph (false: the plain eager step)
    fused_lm_head: bool = True  # log-probs straight from hidden states (kernels.linear_logprobs; false: logits, then token_logprobs)
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response that never ended
    kl_coef: float = 0.2  # beta: weight of the per-token KL penalty
    kl_estimator: str = "k1"  # per-token KL: k1 = log p/q, k2, k3 (Schulman's note on KL approximations)
    adaptive_kl: bool = False  # adapt beta towards target_kl (Ziegler et al. 2019)
    target_kl: float = 6.0  # adaptive beta: KL per response to aim at (nats)
    kl_horizon: int = 10000  # adaptive beta: how fast it moves (responses)
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True  # normalise advantages over the batch
    cliprange: float = 0.2  # policy ratio clip
    cliprange_value: float = 0.2  # value prediction clip
    vf_coef: float = 0.1  # weight of the value loss
    grad_clip: float = 1.0  # max gradient norm
    eval_every: int = 10  # updates between looks at held-out prompts (0: never)
    eval_prompts: str = ""  # held-out prompts JSONL to watch; default: --eval_n prompts of --data, never trained on
    eval_n: int = 64  # how many held-out prompts (held out of --data: at most a tenth of it)
    judge: str = ""  # a judge FILE.py:fn scored on held-out prompts (monitoring only; never trained on)
    keep_best: bool = False  # keep the policy with the best held-out score in OUT/best.pt: the judge's, else the ensemble's conservative score (a single reward model's own score is what over-optimisation inflates, so it is refused)
    max_kl: float = 0.0  # stop when the held-out KL per response passes this (nats; 0: never)
    log_samples_every: int = 10  # updates between a few logged samples in OUT/samples.jsonl (0: never)
    save_every: int = 0  # updates between checkpoints that --resume can continue from (0: at the end only)
    resume: bool = False  # continue from OUT/ckpt.pt (same settings; only --updates may change)
    skip_bad_lines: bool = False  # skip malformed data lines (counted) instead of stopping
    seed: int = 0  # same seed, same numbers (on CPU)
    device: str = ""  # cuda / cpu / cuda:1; default: cuda if available


# ----------------------------------------------------------------------------- pure helpers

def masked_mean(x, mask, d=None):
    """Mean of x where mask is 1; over all processes when d (a Dist) is given."""
    total = torch.stack([(x * mask).sum(), mask.sum()]).double()
    if d is not None and d.ddp:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).float()


def masked_whiten(x, mask, d=None):
    """(x - mean) / std over the valid entries (of every process); masked entries become 0."""
    mean = masked_mean(x, mask, d)
    var = masked_mean((x - mean) ** 2, mask, d)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def response_mask(response, eos_id):
    """(B, N) 1 up to and including each row's first EOS (all ones if it never ends)."""
    is_eos = (response == eos_id).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0  # strictly after the first EOS
    return (~after_eos).long()


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise."""
    ratio = torch.exp(logprobs - old_logprobs)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    stats = {"ppo/clipfrac": masked_mean(((ratio - 1).abs() > cliprange).float(), mask),
             "ppo/approx_kl": masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask),
             "ppo/ratio_mean": masked_mean(ratio, mask)}
    return masked_mean(losses, mask), stats


def value_loss(values, old_values, returns, mask, cliprange_value):
    """Clipped value loss: the prediction may move at most cliprange_value from the rollout's."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    losses = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(losses, mask), {"val/clipfrac": masked_mean(((values - old_values).abs() > cliprange_value).float(), mask)}


# ----------------------------------------------------------------------------- forward passes


# ----------------------------------------------------------------------------- forward passes

def response_logprobs(policy, seq, mask, P, temperature, return_entropy=False):
    """Log-probs (B, N) of the response tokens seq[:, P:] under the policy at `temperature`.
    Position t predicts token t + 1, so positions P - 1 .. T - 2 predict the response; only they
    go through the lm_head (the prompt's logits would be thrown away)."""
    with autocast(seq.device):
        return policy(seq[:, :-1], mask[:, :-1], start=P - 1, targets=seq[:, P:], temperature=temperature,
                      return_entropy=return_entropy)


def response_values(value_model, seq, mask, P):
    """Value (B, N) of the state before each response token."""
    with autocast(seq.device):
        return value_model(seq[:, :-1], mask[:, :-1], start=P - 1).float()


# ----------------------------------------------------------------------------- scoring and watching

def held_out_split(prompts, n):
    """(train, held-out) prompts: the n whose text hashes lowest are held out, whatever the file's
    order or the seed; a prompt held out is never trained on, also where the file repeats it."""
    held = set(sorted(set(prompts), key=lambda p: hashlib.md5(p.encode()).hexdigest())[:n])
    return [p for p in prompts if p not in held], [p for p in prompts if p in held]


def load_judge_fn(spec):
    from rate import judge_scores, load_judge  # the judge machinery, only when a judge is named
    judge = load_judge(spec)
    return lambda prompts, responses: judge_scores(judge, spec, prompts, responses)


def member_scores(reward_models, seq, seq_mask, chunk):
    """(K, B) every reward model's score of each sequence, a chunk of sequences at a time."""
    return torch.cat([ensemble_scores(reward_models, seq[s:s + chunk], seq_mask[s:s + chunk])
                      for s in range(0, seq.size(0), chunk)], 1)


def sample_sequences(cfg, sampler, prompt_ids, eos, generator):
    """The sampler's model's response to each prompt: (seq (B, P + N) the left-padded prompt and
    then the response, seq_mask (B, P + N) 1 on real prompt tokens and on the response up to and
    including its first EOS, P)."""
    query, query_mask, response = generate(sampler.model, prompt_ids, max_new_tokens=cfg.max_new_tokens,
                                           temperature=cfg.temperature, generator=generator, sampler=sampler)
    return torch.cat([query, response], 1), torch.cat([query_mask, response_mask(response, eos)], 1), query.size(1)


@torch.no_grad()
def reference_scores(cfg, ref_sampler, reward_models, prompt_ids, eos, generator, chunk):
    """(K, B) every member's score of the reference policy's own response to each prompt: the
    baseline that the ensemble's spread is measured against (--spread_vs_ref)."""
    seq, seq_mask, _ = sample_sequences(cfg, ref_sampler, prompt_ids, eos, generator)
    return member_scores(reward_models, seq, seq_mask, chunk)


@torch.no_grad()
def rollout_score(cfg, reward_models, reward_fn, seq, seq_mask, prompts, texts, chunk, baseline=None):
    """The score (B,) that PPO maximises, and its parts for logging: the reward models'
    conservative score (over an ensemble: mean - uncertainty_coef * std, the std taken against
    the members' baseline scores when given; one model: its score), plus reward_fn_weight times
    the judge's score. The reward models run a chunk at a time."""
    score, parts = torch.zeros(len(texts), device=seq.device), {}
    if reward_models:
        scores = member_scores(reward_models, seq, seq_mask, chunk)  # (K, B)
        score, spread = conservative_score(scores, cfg.uncertainty_coef, baseline)
        parts["rm_score"] = scores.mean(0)
        if len(reward_models) > 1:
            parts["rm_spread"] = spread
    if reward_fn is not None:
        judged = torch.tensor(reward_fn(prompts, texts), device=seq.device, dtype=torch.float32)
        score = score + cfg.reward_fn_weight * judged
        parts["reward_fn"] = judged
    return score, parts


def sum_over_processes(sums, count, d):
    """{name: per-process sum} and a per-process count -> {name: mean over every process's items}."""
    t = torch.tensor([*sums.values(), count], dtype=torch.float64, device=d.device)
    if d.ddp:
        dist.all_reduce(t)
    return {k: (v / t[-1]).item() for k, v in zip(sums, t)}


def main():
    cfg = parse_config(Config)
    d = setup(cfg.device, cfg.seed)
    assert cfg.batch_size % d.world_size == 0 and cfg.mini_batch_size % d.world_size == 0, "batch sizes must divide by the number of processes"
    assert cfg.batch_size % cfg.mini_batch_size == 0, "batch_size must be a multiple of mini_batch_size"
    assert cfg.kl_estimator in ("k1", "k2", "k3"), f"unknown kl_estimator {cfg.kl_estimator!r}"
    local_batch, local_mini = cfg.batch_size // d.world_size, cfg.mini_batch_size // d.world_size
    cfg.reward = cfg.reward or ("" if cfg.reward_fn else "out/reward/ckpt.pt")

    # ---- models: policy and frozen reference from SFT; frozen reward model(s) and the value model.
    # The frozen ones are kept in bf16 on a GPU (fp32 on CPU): autocast would cast them every forward.
    frozen = compute_dtype(d.device)
    policy = load_model(cfg.init, kind="policy", device=d.device)
    ref_policy = load_model(cfg.ref or cfg.init, kind="policy", device=d.device).to(frozen).eval().requires_grad_(False)
    reward_models = [m.eval().requires_grad_(False) for m in load_ensemble(cfg.reward, d.device, frozen)] if cfg.reward else []
    reward_fn = load_judge_fn(cfg.reward_fn) if cfg.reward_fn else None
    watch_judge = load_judge_fn(cfg.judge) if cfg.judge else None
    if reward_models:  # the value model starts from the reward model (N+ details)
        value_model = load_model(cfg.reward, kind="reward", device=d.device)
    else:  # a judge alone: the policy's trunk with a new scalar head
        value_model = load_model(cfg.init, kind="policy", head="scalar", device=d.device)
    for other, path in [(m, cfg.reward) for m in reward_models[:1]] + [(ref_policy, cfg.ref or cfg.init)]:
        if other.config.tokenizer != policy.config.tokenizer:
            raise CheckpointError(f"{path}: {'reward model' if other is not ref_policy else 'reference'} uses tokenizer "
                                  f"{other.config.tokenizer!r} but the policy {cfg.init} uses {policy.config.tokenizer!r}")
    if cfg.keep_best and not (cfg.judge or len(reward_models) > 1 or not reward_models):
        raise ConfigError("--keep_best true needs a judge (--judge FILE.py:fn) or a reward-model ensemble (reward.py "
                          "--ensemble K): a single reward model's own score is the very number over-optimisation "
                          "inflates, so it cannot pick the best checkpoint")
    best_key = "eval/judge" if cfg.judge else "eval/score"  # the score that picks OUT/best.pt
    enc = get_tokenizer(policy.config.tokenizer)
    eos = enc.eot_token
    # No dropout anywhere (N+ details): the rollout's log-probs and the first training forward agree.
    assert policy.config.dropout == 0 and value_model.config.dropout == 0, "PPO needs dropout 0"
    print0(f"policy {policy.num_params() / 1e6:.2f}M, value {value_model.num_params() / 1e6:.2f}M parameters; "
           f"{len(reward_models)} reward model(s){', judge ' + cfg.reward_fn if cfg.reward_fn else ''}; "
           f"device {d.device}, {d.world_size} process(es)")
    optimizer = make_optimizer(torch.nn.ModuleList([policy, value_model]), cfg.lr, 0.0, d.device, betas=(0.9, 0.999))
    ddp_policy = DDP(policy) if d.ddp else policy
    ddp_value = DDP(value_model) if d.ddp else value_model
    policy.fused_lm_head = ref_policy.fused_lm_head = cfg.fused_lm_head
    # the policy's rollout copy: bf16 on GPU, refreshed once per rollout; its decode step a CUDA graph
    sampler = Sampler(policy, dtype=frozen, cuda_graph=cfg.cuda_graph)
    # the reference's own responses, which an ensemble's spread is measured against
    ref_sampler = Sampler(ref_policy, cuda_graph=cfg.cuda_graph) if cfg.spread_vs_ref and len(reward_models) > 1 else None

    # ---- prompts, and the held-out ones PPO watches but never trains on
    stats = {}
    if cfg.data == "task":
        prompts = task.prompts("train")
        stats["rows"] = len(prompts)
    else:
        prompts = load_prompts(cfg.data, skip_bad_lines=cfg.skip_bad_lines, stats=stats)
    eval_prompts = []
    if cfg.eval_every:
        if cfg.eval_prompts:
            eval_prompts = load_prompts(cfg.eval_prompts, skip_bad_lines=cfg.skip_bad_lines)[:cfg.eval_n]
        else:  # at most a tenth of the file, so a small file still has prompts to train on
            prompts, eval_prompts = held_out_split(prompts, min(cfg.eval_n, len(prompts) // 10))
    if len(prompts) < cfg.batch_size:
        raise DataError(f"{cfg.data}: {len(prompts)} prompts{' left after holding out ' + str(len(eval_prompts)) if eval_prompts and not cfg.eval_prompts else ''}, "
                        f"fewer than one rollout of --batch_size {cfg.batch_size}")
    max_prompt = policy.config.block_size - cfg.max_new_tokens
    prompt_ids = encode_prompts(enc, prompts, max_prompt, stats)
    eval_ids = encode_prompts(enc, eval_prompts, max_prompt)
    on_task = all(task.is_task_prompt(p) for p in prompts[:100])
    print0(f"data: {len(prompts)} prompts, {stats['truncated']} cut from the left to {max_prompt} tokens, "
           f"{stats.get('bad_lines', 0)} bad lines skipped; {len(eval_prompts)} held-out prompts watched"
           + (" (built-in task: the gold score is logged, never trained on)" if on_task else ""))

    gen = torch.Generator().manual_seed(cfg.seed)  # the same on every process: they agree on the batch
    sample_gen = torch.Generator(device=d.device).manual_seed(cfg.seed + d.rank)  # each process its own samples
    order, cursor, beta, start, best = torch.randperm(len(prompts), generator=gen), 0, cfg.kl_coef, 0, None
    ckpt = resume_checkpoint(cfg, "policy", "updates", d)
    if ckpt is not None:
        r = ckpt["resume"]
        policy.load_state_dict(ckpt["model"])
        value_model.load_state_dict(r["value"])
        optimizer.load_state_dict(ckpt["optimizer"])
        order, cursor, beta, start, best = r["order"], r["cursor"], ckpt["beta"], ckpt["step"], r["best"]
        set_rng_states(d, r["rng"], gen, sample_gen)
    logger = Logger(cfg.out, d.master, resume_step=start if ckpt else None)
    samples_path = os.path.join(cfg.out, "samples.jsonl")
    if d.master:
        keep_rows(samples_path, start if ckpt else None)  # like metrics.jsonl: no step twice

    def save(update):
        rng = rng_states(d, gen, sample_gen)  # every process takes part
        if d.master:
            state = {"order": order, "cursor": cursor, "best": best, "rng": rng, "value": value_model.state_dict()}
            save_checkpoint(f"{cfg.out}/ckpt.pt", policy, kind="policy", config=cfg, step=update, optimizer=optimizer,
                            beta=beta, resume=state)
            save_checkpoint(f"{cfg.out}/value.pt", value_model, kind="value", config=cfg, step=update)

    def look(update):
        """8. the held-out prompts: log eval/*, keep the best policy; True when KL passed --max_kl."""
        nonlocal best
        metrics = watch(cfg, d, sampler, policy, ref_policy, reward_models, reward_fn, watch_judge, eval_prompts,
                        eval_ids, enc, on_task, local_mini, eval_baseline)
        logger.log(update, metrics, bar=bar)
        if best is None or metrics[best_key] > best[0]:
            best = (metrics[best_key], update)
            if cfg.keep_best and d.master:
                save_checkpoint(f"{cfg.out}/best.pt", policy, kind="policy", config=cfg, step=update, **metrics)
        return cfg.max_kl and metrics["eval/kl"] > cfg.max_kl

    eval_baseline = None  # the reference's responses to this process's held-out prompts: fixed, so scored once
    if ref_sampler and eval_prompts:
        ref_generator = torch.Generator(device=d.device).manual_seed(cfg.seed + 1 + d.world_size + d.rank)
        eval_baseline = reference_scores(cfg, ref_sampler, reward_models, eval_ids[d.rank::d.world_size], eos,
                                         ref_generator, local_mini)

    t_start, stop = time.time(), None
    bar = tqdm(range(start + 1, cfg.updates + 1), desc="ppo", disable=None if d.master else True, dynamic_ncols=True,
               initial=start, total=cfg.updates)
    if eval_prompts and start == 0:
        look(0)  # the SFT policy itself: the baseline, and the best until something beats it
    for update in bar:
        # ---- 1. prompts for this rollout: the global batch, this process's share of it
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(prompts), generator=gen), 0
        batch_idx = order[cursor:cursor + cfg.batch_size][d.rank * local_batch:(d.rank + 1) * local_batch].tolist()
        cursor += cfg.batch_size

        # ---- 2. generate, cut each response after its EOS
        t0 = time.time()
        policy.eval()
        sampler.load(policy)
        seq, seq_mask, P = sample_sequences(cfg, sampler, [prompt_ids[i] for i in batch_idx], eos, sample_gen)
        response, mask = seq[:, P:], seq_mask[:, P:].float()  # (B, N)
        texts = [decode(enc, r) for r in response.tolist()]
        t_gen = time.time() - t0

        # ---- 3. score the finished rollout: no dropout, no gradient, in minibatch-sized chunks,
        # exactly as the first training minibatch will see it (so its ratio is exactly 1)
        t0 = time.time()
        with torch.no_grad():
            old_logprobs, ref_logprobs, old_values = [], [], []
            for s in range(0, local_batch, local_mini):
                c = slice(s, s + local_mini)
                old_logprobs.append(response_logprobs(policy, seq[c], seq_mask[c], P, cfg.temperature))
                ref_logprobs.append(response_logprobs(ref_policy, seq[c], seq_mask[c], P, cfg.temperature))
                old_values.append(response_values(value_model, seq[c], seq_mask[c], P))
            old_logprobs, ref_logprobs, old_values = (torch.cat(x) for x in (old_logprobs, ref_logprobs, old_values))
            baseline = reference_scores(cfg, ref_sampler, reward_models, [prompt_ids[i] for i in batch_idx], eos,
                                        sample_gen, local_mini) if ref_sampler else None
            raw_scores, parts = rollout_score(cfg, reward_models, reward_fn, seq, seq_mask, [prompts[i] for i in batch_idx],
                                              texts, local_mini, baseline)
            ended = (response == eos).any(1)
            scores = raw_scores - cfg.missing_eos_penalty * (~ended).float()  # N+ details: punish rambling on

            # ---- 4 + 5. KL-shaped rewards and GAE in one fused op, then whitened advantages
            advantages, returns, kl = ppo_advantages(scores, old_logprobs, ref_logprobs, old_values, mask, kl_coef=beta,
                                                     gamma=cfg.gamma, lam=cfg.lam, kl_estimator=cfg.kl_estimator)
            if cfg.whiten_advantages:
                advantages = masked_whiten(advantages, mask, d)
        t_score = time.time() - t0

        # ---- 6. PPO epochs over minibatches
        t0 = time.time()
        policy.train()
        value_model.train()
        step_stats = []
        for epoch in range(cfg.ppo_epochs):
            # epoch 0 in rollout order (already a random sample of prompts), later ones shuffled
            perm = torch.arange(local_batch) if epoch == 0 else torch.randperm(local_batch, generator=gen)
            for s in range(0, local_batch, local_mini):
                mb = perm[s:s + local_mini].to(d.device)
                m = mask[mb]
                logprobs, entropy = response_logprobs(ddp_policy, seq[mb], seq_mask[mb], P, cfg.temperature, return_entropy=True)
                pg_loss, pg_stats = policy_loss(logprobs, old_logprobs[mb], advantages[mb], m, cfg.cliprange)
                values = response_values(ddp_value, seq[mb], seq_mask[mb], P)
                vf_loss, vf_stats = value_loss(values, old_values[mb], returns[mb], m, cfg.cliprange_value)
                loss = pg_loss + cfg.vf_coef * vf_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(policy.parameters()) + list(value_model.parameters()), cfg.grad_clip)
                optimizer.step()
                step_stats.append({"ppo/policy_loss": pg_loss.detach(), "ppo/value_loss": vf_loss.detach(),
                                   "objective/entropy": masked_mean(entropy.detach(), m), **pg_stats, **vf_stats})
                if update == 1 and epoch == 0 and s == 0:  # nothing has changed yet: the ratio is exactly 1
                    first_ratio_error = (logprobs - old_logprobs[mb]).exp().sub(1).abs().max().item()
        t_train = time.time() - t0

        # ---- 7. adaptive KL controller (Ziegler et al. 2019, section 2.2): proportional, clipped
        kl_per_response = (kl * mask).sum(1)  # (B,)
        mean_kl = all_reduce_mean(kl_per_response.mean().item(), d)
        if cfg.adaptive_kl:
            error = max(-0.2, min(0.2, mean_kl / cfg.target_kl - 1))
            beta *= 1 + error * cfg.batch_size / cfg.kl_horizon

        # ---- log
        var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
        var_residual = masked_mean((returns - old_values - masked_mean(returns - old_values, mask)) ** 2, mask)
        metrics = {"objective/score": raw_scores.mean().item(), "objective/kl": mean_kl,
                   "objective/rlhf_reward": (scores - beta * kl_per_response).mean().item(),
                   **{f"objective/{k}": v.mean().item() for k, v in parts.items()},
                   **{k: torch.stack([s[k] for s in step_stats]).mean().item() for k in step_stats[0]},
                   "val/explained_var": (1 - var_residual / var_returns.clamp(min=1e-8)).item(),
                   "rollout/resp_len": mask.sum(1).mean().item(), "rollout/eos_rate": ended.float().mean().item(),
                   "beta": beta}
        gold = [task.gold_score(prompts[i], t) for i, t in zip(batch_idx, texts)] if on_task else None
        if gold:  # monitoring only: PPO never sees the gold score
            metrics["gold"] = sum(gold) / len(gold)
        metrics = {k: all_reduce_mean(v, d) if k != "beta" else v for k, v in metrics.items()}
        seconds = t_gen + t_score + t_train
        metrics.update({"tok/s": round(float(seq_mask.sum()) * d.world_size / seconds), "time/generation": t_gen,
                        "time/scoring": t_score, "time/training": t_train})
        if update == 1:
            metrics["ppo/first_ratio_error"] = first_ratio_error  # max |ratio - 1|, on the first minibatch
        console = ["objective/score", "objective/kl", "gold", "objective/entropy", "ppo/clipfrac", "rollout/resp_len", "beta", "tok/s"]
        logger.log(update, metrics, console=console, bar=bar)
        if d.master and cfg.log_samples_every and update % cfg.log_samples_every == 0:
            rows = [{"step": update, "prompt": prompts[i], "response": texts[j], "score": raw_scores[j].item(),
                     "kl": kl_per_response[j].item(), **({"gold": gold[j]} if gold else {})}
                    for j, i in enumerate(batch_idx[:4])]
            with open(samples_path, "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            bar.write(f"sample | {rows[0]['prompt'][-60:]!r} -> {rows[0]['response'][:100]!r} | score {rows[0]['score']:.3f}"
                      f" | kl {rows[0]['kl']:.2f}" + (f" | gold {rows[0]['gold']:.2f}" if gold else ""))

        # ---- 8. the held-out prompts: over-optimisation shows here first
        if eval_prompts and update % cfg.eval_every == 0 and look(update):
            where = (f"the best checkpoint so far is {cfg.out}/best.pt (update {best[1]}, {best_key} {best[0]:.3f})"
                     if cfg.keep_best else f"the last checkpoint is {cfg.out}/ckpt.pt (update {update})")
            stop = f"stopped at update {update}: the held-out KL per response passed --max_kl {cfg.max_kl}; {where}"
            print0(stop)
            save(update)
            break
        if cfg.save_every and update % cfg.save_every == 0 and update < cfg.updates:
            save(update)

    if stop is None:
        save(cfg.updates)
    result = stop or f"{cfg.updates} updates in {time.time() - t_start:.0f}s"
    if cfg.keep_best and best is not None:
        result += f" | best held-out {best_key} {best[0]:.3f} at update {best[1]}: {cfg.out}/best.pt"
    print0(done_line("ppo", stats, result, f"{cfg.out}/ckpt.pt (policy) and {cfg.out}/value.pt", d.device))
    cleanup(d)


@torch.no_grad()
def watch(cfg, d, sampler, policy, ref_policy, reward_models, reward_fn, watch_judge, eval_prompts, eval_ids, enc,
          on_task, chunk, baseline=None):
    """eval/* metrics of the policy on the held-out prompts, each process answering its share:
    the score PPO optimises (and its parts), the exact KL to the reference per response (over the
    whole vocabulary, kernels.kl_full), the response length, and the judge's or gold score. The
    samples are drawn with the same seed every time, so a curve shows the policy, not the noise.
    baseline (K, mine): the members' scores of the reference's responses (--spread_vs_ref)."""
    sampler.load(policy)
    generator = torch.Generator(device=d.device).manual_seed(cfg.seed + 1 + d.rank)
    mine = list(range(d.rank, len(eval_ids), d.world_size))
    seq, seq_mask, P = sample_sequences(cfg, sampler, [eval_ids[i] for i in mine], enc.eot_token, generator)
    mask = seq_mask[:, P:].float()
    prompts, texts = [eval_prompts[i] for i in mine], [decode(enc, r) for r in seq[:, P:].tolist()]
    kl = []
    for s in range(0, len(mine), chunk):
        c = slice(s, s + chunk)
        with autocast(seq.device):
            logits = policy(seq[c, :-1], seq_mask[c, :-1], start=P - 1)  # (b, N, V)
            ref_logits = ref_policy(seq[c, :-1], seq_mask[c, :-1], start=P - 1)
        kl.append((kl_full(logits, ref_logits, temperature=cfg.temperature) * mask[c]).sum(1))
    score, parts = rollout_score(cfg, reward_models, reward_fn, seq, seq_mask, prompts, texts, chunk, baseline)
    sums = {"eval/score": score.sum(), **{f"eval/{k}": v.sum() for k, v in parts.items()},
            "eval/kl": torch.cat(kl).sum(), "eval/resp_len": mask.sum()}
    if watch_judge is not None:
        sums["eval/judge"] = sum(watch_judge(prompts, texts))
    if on_task:
        sums["eval/gold"] = sum(task.gold_score(p, t) for p, t in zip(prompts, texts))
    return sum_over_processes(sums, len(mine), d)


if __name__ == "__main__":
    run_main(main)
