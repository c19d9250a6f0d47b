"""
Stage 3, RL from the reward model: make the SFT policy score higher under the reward model while
a KL penalty keeps it near the frozen SFT reference (InstructGPT, Ouyang et al. 2022, section
3.5; the defaults follow "The N+ Implementation Details of RLHF with PPO", Huang et al. 2024).

Each update: 1. sample prompts; 2. generate responses (--group_size per prompt); 3. score them
with the reward model and run the policy, the reference (and the value model) over the finished
rollout; 4. advantages (--advantage); 5. several epochs of the clipped policy loss (and the value
loss) over minibatches, the learning rate decaying to a tenth by the last update; 6. adapt the KL
coefficient; 7. every --eval_every updates, evaluate on held-out prompts.

The advantage estimators (--advantage) share everything else, the clipped ratio objective included:
    gae           PPO: per-token rewards -kl_coef * KL_t plus the score on the last token, a value
                  model (started from the reward model), GAE (gamma, lam), advantages whitened
    grpo          K responses per prompt; (r - group mean) / group std (Shao et al. 2024); no value model
    rloo          K responses per prompt; r - mean of the other K - 1 (Ahmadian et al. 2024); no value model
    reinforce_pp  REINFORCE++ (Hu 2025): K responses per prompt, each score less its group's mean
                  (the baseline variant), per-token rewards as gae's, returns with lam = 1 and no
                  critic, whitened over the whole batch; no value model (--group_size 1: plain REINFORCE++)
r is the score minus kl_coef times the response's KL estimate (--kl_in reward, k1: unbiased), or the
score alone with the KL estimate (k3 by default) in the loss (--kl_in loss, as GRPO). Groups whose
responses all score the same carry no signal: they are dropped from the loss and counted.

    python ppo.py                            # built-in task: out/sft policy, out/reward reward model
    python ppo.py --advantage grpo           # GRPO: 4 responses to each of 32 prompts an update, no value model
    python ppo.py --init out/sft/ckpt.pt --reward out/reward/ckpt.pt --data prompts.jsonl --out out/ppo
    python ppo.py --reward_fn judges/great_day.py:great_day --data task   # a judge function, no reward model
    python ppo.py --reward out/reward3 --uncertainty_coef 1 --keep_best true    # an ensemble, conservative
    torchrun --nproc_per_node=2 ppo.py

Data: prompts JSONL ({prompt}; any file with a prompt field, HH-RLHF too), or "task".

The score: a reward model (--reward), or an ensemble of them (reward.py --ensemble K), whose
score is their mean minus --uncertainty_coef times their spread (Coste et al. 2023); the spread
is over each member's score minus its score of the reference's own response to the same prompt,
since a ranking loss leaves every member free to add its own constant per prompt
(--spread_vs_ref; it costs one more generation per rollout, by the reference); and/or a
judge function (--reward_fn FILE.py:fn, weighted by --reward_fn_weight; without a reward model
gae's value model starts from the policy's trunk with a new head).

Over-optimisation shows on prompts the policy never trains on: every --eval_every updates it
answers --eval_prompts (default: --eval_n prompts held out of --data), and their score, ensemble
spread, exact KL to the reference, length (and judge or gold score) are logged as eval/*.
--keep_best true keeps the checkpoint with the best held-out score in OUT/best.pt, and --max_kl
stops a run that drifts too far.
"""

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import Batches, ConfigError, Run, RunConfig, all_reduce_mean, apply_lora, check, check_out, check_positive, \
    check_tokenizers, cleanup, compute_dtype, done_line, keep_rows, load_model, make_optimizer, parse_config, print0, \
    lr_at, run_main, save_checkpoint, setup
from data.tasks import from_spec, task_of
from data.formats import DataError, held_out_prompts, load_prompts
from data.tokenizer import get_tokenizer, use_chat_template
from judges import judge_fn
from kernels import ppo_advantages
from losses import aggregate, group_advantages, kl_penalty, masked_mean, masked_whiten, policy_loss, value_loss
from model import Reference, Sampler
from rollout import encode_prompts, exact_kl, generate, response_logprobs, response_values
from scoring import load_ensemble, member_scores, rollout_score


@dataclass
class Config(RunConfig):
    data: str = "task"  # prompts JSONL (.gz too), or "task" for the built-in task's train prompts ("task:sort", ...: a task of the suite)
    init: str = "out/sft/ckpt.pt"  # SFT checkpoint: the policy starts here and stays the frozen reference
    ref: str = ""  # the frozen reference for the KL penalty; default: --init (a later round starts --init from its last policy and keeps SFT here)
    reward: str = ""  # reward model checkpoint (an ensemble's ckpt.pt loads every member); default out/reward/ckpt.pt, none with --reward_fn alone
    reward_fn: str = ""  # a judge FILE.py:fn(prompts, responses) -> [float] that scores responses, instead of or beside --reward
    reward_fn_weight: float = 1.0  # weight of --reward_fn's score when it is added to a reward model's
    uncertainty_coef: float = 0.0  # with an ensemble: score = mean - coef * std over the members (0: the plain mean)
    spread_vs_ref: bool = True  # with an ensemble: the std of each member's score minus its score of the reference's own response to the prompt (a ranking loss leaves a constant per prompt free; false: the std of the scores themselves)
    out: str = "out/ppo"  # output directory: ckpt.pt (policy), value.pt, metrics.jsonl, samples.jsonl, best.pt
    advantage: str = "gae"  # gae (PPO with a value model), grpo, rloo or reinforce_pp (critic-free: no value model)
    group_size: int = 0  # responses per prompt in a rollout (0: 1 for gae, 4 for the critic-free estimators)
    loss_agg: str = "token"  # the policy loss over a minibatch: token mean, sequence (mean of each response's token mean), or constant (Dr. GRPO: sum / (responses x max_new_tokens))
    updates: int = 120  # rollout + optimisation rounds
    batch_size: int = 0  # responses per rollout, over all processes (/ group_size prompts); 0: 64 for gae, 128 for the critic-free ones (about as long an update: benchmarks/suite.md)
    mini_batch_size: int = 16  # responses per gradient step, over all processes
    ppo_epochs: int = 4  # passes over each rollout
    lr: float = 0.0  # Adam learning rate for policy and value model (0: 1e-4, and 2e-4 for grpo, whose batch is twice PPO's: benchmarks/suite.md)
    lr_decay: bool = True  # cosine decay of the learning rate to a tenth by the last update (false: constant; chosen on the task suite, benchmarks/suite.md)
    max_new_tokens: int = 40  # longest response; one that ends without EOS is penalised
    temperature: float = 1.0  # sampling temperature, also used for every log-prob (N+ details)
    cuda_graph: bool = True  # on GPU, replay the decode step as a CUDA graph (false: the plain eager step)
    fused_lm_head: bool = True  # log-probs straight from hidden states (kernels.linear_logprobs; false: logits, then token_logprobs)
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response that never ended
    kl_coef: float = 0.5  # weight of the KL penalty to the reference (0.5, not 0.2, chosen on the task suite: benchmarks/suite.md)
    kl_in: str = "reward"  # where the KL penalty goes: reward (per token, before the advantages) or loss (a term of the policy loss, as GRPO)
    kl_estimator: str = ""  # per-token KL estimate: k1 = log p/q, k2, k3 (Schulman's note on KL approximations); default k1 in the reward, k3 in the loss
    adaptive_kl: bool = False  # adapt kl_coef towards target_kl (Ziegler et al. 2019)
    target_kl: float = 6.0  # adaptive kl_coef: KL per response to aim at (nats)
    kl_horizon: int = 10000  # adaptive kl_coef: how fast it moves (responses)
    gamma: float = 1.0  # discount (gae, reinforce_pp)
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True  # gae: normalise advantages over the batch
    cliprange: float = 0.2  # policy ratio clip
    cliprange_value: float = 0.2  # value prediction clip
    vf_coef: float = 0.1  # gae: weight of the value loss
    grad_clip: float = 1.0  # max gradient norm
    eval_every: int = 10  # updates between evaluations on held-out prompts (0: never)
    eval_prompts: str = ""  # held-out prompts JSONL to evaluate on; default: --eval_n prompts of --data, never trained on
    eval_n: int = 64  # how many held-out prompts (held out of --data: at most a tenth of it)
    judge: str = ""  # a judge FILE.py:fn scored on held-out prompts (monitoring only; never trained on)
    keep_best: bool = False  # keep the policy with the best held-out score in OUT/best.pt: the judge's, else the ensemble's conservative score (a single reward model's own score is what over-optimisation inflates, so it is refused)
    max_kl: float = 0.0  # stop when the held-out KL per response passes this (nats; 0: never)
    log_samples_every: int = 10  # updates between a few logged samples in OUT/samples.jsonl (0: never)

    def check(self):
        check(self.advantage in ESTIMATORS, f"--advantage {self.advantage}: expected one of {', '.join(ESTIMATORS)}")
        self.group_size = self.group_size or (1 if self.advantage == "gae" else 4)
        self.batch_size = self.batch_size or (64 if self.advantage == "gae" else 128)
        self.lr = self.lr or (2e-4 if self.advantage == "grpo" else 1e-4)
        check(self.lr > 0, f"--lr must be above 0, not {self.lr}")
        check_positive(self, "updates", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens")
        check(self.group_size >= 2 or self.advantage not in ("grpo", "rloo"),
              f"--advantage {self.advantage} compares the responses to one prompt: --group_size must be 2 or more")
        check(self.batch_size % self.group_size == 0,
              f"--batch_size {self.batch_size} must be a multiple of --group_size {self.group_size}")
        check(self.batch_size % self.mini_batch_size == 0,
              f"--batch_size {self.batch_size} must be a multiple of --mini_batch_size {self.mini_batch_size}")
        check(self.loss_agg in ("token", "sequence", "constant"), f"--loss_agg {self.loss_agg}: expected token, sequence or constant")
        check(self.kl_in in ("reward", "loss"), f"--kl_in {self.kl_in}: expected reward or loss")
        self.kl_estimator = self.kl_estimator or ("k1" if self.kl_in == "reward" else "k3")
        check(self.kl_estimator in ("k1", "k2", "k3"), f"--kl_estimator {self.kl_estimator}: expected k1, k2 or k3")
        check(self.temperature > 0, f"--temperature must be above 0, not {self.temperature}")
        check(self.eval_every >= 0 and self.eval_n >= 0, "--eval_every and --eval_n must be 0 or more")


ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")


@dataclass
class Models:
    """Everything ppo.py runs: the policy it trains, the frozen reference and scorers, gae's value
    model (None for the critic-free estimators), and the policy's sampling copy."""
    policy: torch.nn.Module
    ref: torch.nn.Module
    value: torch.nn.Module | None
    reward_models: list  # frozen; K > 1 for an ensemble
    reward_fn: object  # --reward_fn as a function, or None
    judge: object  # --judge as a function (evaluation only), or None
    sampler: Sampler  # the policy's rollout copy: bf16 on GPU, refreshed once per rollout; its decode step a CUDA graph
    ref_sampler: Sampler | None  # the reference's own responses, which an ensemble's spread is measured against


def load_models(cfg, d):
    """The policy and the frozen reference from SFT; the frozen reward model(s) and judges; gae's
    value model, which starts from the reward model (N+ details), or from the policy's trunk with a
    new head when a judge alone scores. The frozen ones are kept in bf16 on a GPU (fp32 on CPU):
    autocast would cast them at every forward."""
    frozen = compute_dtype(d.device)
    policy = apply_lora(cfg, load_model(cfg.init, kind="policy", device=d.device, flag="--init"))
    if cfg.lora_rank and cfg.ref in ("", cfg.init):  # the policy's base weights, adapters off: no second copy
        ref = Reference(policy)
    else:
        ref = load_model(cfg.ref or cfg.init, kind="policy", device=d.device, flag="--ref").to(frozen).eval().requires_grad_(False)
    reward_models = load_ensemble(cfg.reward, d.device, frozen) if cfg.reward else []
    reward_fn = judge_fn(cfg.reward_fn) if cfg.reward_fn else None
    judge = judge_fn(cfg.judge) if cfg.judge else None
    value = None
    if cfg.advantage == "gae":
        value = apply_lora(cfg, load_model(cfg.reward, kind="reward", device=d.device, flag="--reward") if reward_models else
                           load_model(cfg.init, kind="policy", head="scalar", device=d.device, flag="--init"))
    check_tokenizers({cfg.init: policy, cfg.ref or cfg.init: ref, **({cfg.reward: reward_models[0]} if reward_models else {})})
    if cfg.keep_best and not (cfg.judge or len(reward_models) > 1 or not reward_models):
        raise ConfigError("--keep_best true needs a judge (--judge FILE.py:fn) or a reward-model ensemble (reward.py "
                          "--ensemble K): a single reward model's own score is the very number over-optimisation "
                          "inflates, so it cannot pick the best checkpoint")
    # No dropout anywhere (N+ details): the rollout's log-probs and the first training forward agree.
    assert policy.config.dropout == 0 and (value is None or value.config.dropout == 0), "RL here needs dropout 0"
    policy.fused_lm_head = ref.fused_lm_head = cfg.fused_lm_head
    ref_sampler = None
    if cfg.spread_vs_ref and len(reward_models) > 1:
        if isinstance(ref, Reference):
            raise ConfigError("--spread_vs_ref true samples from the reference, which with --lora_rank is the policy's own "
                              "base weights inside the policy; use --spread_vs_ref false with --lora_rank")
        ref_sampler = Sampler(ref, cuda_graph=cfg.cuda_graph)
    print0(f"policy {policy.num_params() / 1e6:.2f}M parameters, --advantage {cfg.advantage}"
           f"{f', value model {value.num_params() / 1e6:.2f}M' if value else ' (no value model)'}; "
           f"{len(reward_models)} reward model(s){', judge ' + cfg.reward_fn if cfg.reward_fn else ''}; "
           f"device {d.device}, {d.world_size} process(es)")
    return Models(policy, ref, value, reward_models, reward_fn, judge,
                  Sampler(policy, dtype=frozen, cuda_graph=cfg.cuda_graph), ref_sampler)


def load_data(cfg, d, enc, max_prompt):
    """(prompts, their token ids, held-out prompts, their ids, stats): the prompts to train on,
    and those evaluated on but never trained on."""
    stats = {}
    task = from_spec(cfg.data)
    if task:
        prompts = task.prompts("train")
        stats["rows"] = len(prompts)
    else:
        prompts = load_prompts(cfg.data, skip_bad_lines=cfg.skip_bad_lines, stats=stats)
    eval_prompts = []
    if cfg.eval_every:
        if cfg.eval_prompts:
            eval_prompts = load_prompts(cfg.eval_prompts, skip_bad_lines=cfg.skip_bad_lines)[:cfg.eval_n]
        else:  # at most a tenth of the file, so a small file still has prompts to train on
            prompts, eval_prompts = held_out_prompts(prompts, min(cfg.eval_n, len(prompts) // 10))
    n = cfg.batch_size // cfg.group_size
    if len(prompts) < n:
        held = f" left after holding out {len(eval_prompts)} to evaluate on" if eval_prompts and not cfg.eval_prompts else ""
        raise DataError(f"{cfg.data}: {len(prompts)} prompts{held}, fewer than the {n} of one rollout "
                        f"(--batch_size {cfg.batch_size} / --group_size {cfg.group_size}); add prompts or lower --batch_size")
    prompt_ids = encode_prompts(enc, prompts, max_prompt, stats)
    eval_ids = encode_prompts(enc, eval_prompts, max_prompt)
    print0(f"data: {len(prompts)} prompts, {stats['truncated']} cut from the left to {max_prompt} tokens, "
           f"{stats.get('bad_lines', 0)} bad lines skipped; {len(eval_prompts)} held-out prompts to evaluate on")
    return prompts, prompt_ids, eval_prompts, eval_ids, stats


def main():
    # ---- 0. config, models, data
    cfg = parse_config(Config)
    d = setup(cfg.device, cfg.seed)
    check(cfg.batch_size // cfg.group_size % d.world_size == 0 and cfg.mini_batch_size % d.world_size == 0,
          f"--batch_size / --group_size ({cfg.batch_size // cfg.group_size} prompts) and --mini_batch_size "
          f"({cfg.mini_batch_size}) must be multiples of the {d.world_size} processes")
    check_out(cfg)
    local_mini = cfg.mini_batch_size // d.world_size
    cfg.reward = cfg.reward or ("" if cfg.reward_fn else "out/reward/ckpt.pt")
    m = load_models(cfg, d)
    best_key = "eval/judge" if cfg.judge else "eval/score"  # the score that picks OUT/best.pt
    enc = get_tokenizer(m.policy.config.tokenizer)
    use_chat_template(enc, cfg.chat_template)
    prompts, prompt_ids, eval_prompts, eval_ids, stats = load_data(cfg, d, enc, m.policy.config.block_size - cfg.max_new_tokens)
    task = task_of(prompts[:100])  # a task of the suite: its hidden gold score is logged, never trained on

    trained = torch.nn.ModuleList([m.policy] + ([m.value] if m.value else []))
    gen = torch.Generator().manual_seed(cfg.seed)  # the same on every process: they agree on the batch
    sample_gen = torch.Generator(device=d.device).manual_seed(cfg.seed + d.rank)  # each process its own samples
    run = Run(cfg, d, m.policy, make_optimizer(trained, cfg.lr, 0.0, d.device, betas=(0.9, 0.999)),
              Batches(len(prompts), cfg.batch_size // cfg.group_size, gen, d), kind="policy", step_field="updates",
              generators=[gen, sample_gen])
    ddp_value = (DDP(m.value) if d.ddp else m.value) if m.value else None
    start = run.resume()
    kl_coef, best = (run.resumed["kl_coef"], run.resumed["best"]) if run.resumed else (cfg.kl_coef, None)
    if run.resumed and m.value:
        m.value.load_state_dict(run.resumed["value"])
    logger = run.logger
    samples_path = os.path.join(cfg.out, "samples.jsonl")
    if d.master:
        keep_rows(samples_path, start if run.resumed else None)  # like metrics.jsonl: no step twice

    def save(update):
        run.save(update, resume={"kl_coef": kl_coef, "best": best, **({"value": m.value.state_dict()} if m.value else {})})
        if d.master and m.value:
            save_checkpoint(f"{cfg.out}/value.pt", m.value, kind="value", config=cfg, step=update)

    eval_baseline = None  # the reference's responses to this process's held-out prompts: fixed, so scored once
    if m.ref_sampler and eval_prompts:
        ref_generator = torch.Generator(device=d.device).manual_seed(cfg.seed + 1 + d.world_size + d.rank)
        eval_baseline = reference_scores(cfg, m, eval_ids[d.rank::d.world_size], ref_generator, local_mini)
    evaluation = Evaluation(cfg, d, m, eval_prompts, eval_ids, task, local_mini, eval_baseline)

    t_start, stop = time.time(), None
    bar = tqdm(range(start + 1, cfg.updates + 1), desc=cfg.advantage, disable=None if d.master else True,
               dynamic_ncols=True, initial=start, total=cfg.updates)
    if eval_prompts and start == 0:  # the SFT policy itself: the baseline, and the best until something beats it
        best = evaluation.log(0, logger, bar, best, best_key)
    for update in bar:
        # ---- 1. prompts for this rollout: this process's share of the global batch, each group_size times
        batch_idx = [i for i in run.batches.next() for _ in range(cfg.group_size)]
        batch_prompts = [prompts[i] for i in batch_idx]

        # ---- 2. generate, cut each response after its EOS
        t0 = time.time()
        m.policy.eval()
        m.sampler.load(m.policy)
        rollout = generate(m.sampler, [prompt_ids[i] for i in batch_idx], max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, generator=sample_gen)
        t_gen = time.time() - t0

        # ---- 3 + 4. score the finished rollout, advantages
        t0 = time.time()
        r = score_rollout(cfg, m, rollout, batch_prompts, prompt_ids, batch_idx, sample_gen, local_mini)
        r.update(advantages(cfg, d, r, rollout.mask, kl_coef))
        t_score = time.time() - t0

        # ---- 5. epochs of minibatches
        t0 = time.time()
        if cfg.lr_decay:
            for g in run.optimizer.param_groups:
                g["lr"] = lr_at(update, cfg.lr, 0, cfg.updates)
        step_stats = train_on_rollout(cfg, d, rollout, r, run.ddp_model, ddp_value, trained, run.optimizer, gen, local_mini,
                                      kl_coef)
        t_train = time.time() - t0

        # ---- 6. adaptive KL controller (Ziegler et al. 2019, section 2.2): proportional, clipped
        kl_per_response = (r["kl"] * rollout.mask).sum(1)  # (B,)
        mean_kl = all_reduce_mean(kl_per_response.mean().item(), d)
        if cfg.adaptive_kl:
            error = max(-0.2, min(0.2, mean_kl / cfg.target_kl - 1))
            kl_coef *= 1 + error * cfg.batch_size / cfg.kl_horizon

        # ---- log
        gold = task.gold(batch_prompts, rollout.texts) if task else None  # monitoring only: never trained on
        metrics = update_metrics(cfg, d, rollout, r, step_stats, kl_per_response, mean_kl, kl_coef, gold)
        seconds = t_gen + t_score + t_train
        metrics["lr"] = run.optimizer.param_groups[0]["lr"]
        metrics.update({"tok/s": round(float(rollout.seq_mask.sum()) * d.world_size / seconds), "time/generation": t_gen,
                        "time/scoring": t_score, "time/training": t_train})
        console = ["objective/score", f"objective/kl_{cfg.kl_estimator}", "gold", "objective/entropy", "ppo/clipfrac",
                   "rollout/resp_len", "rollout/dropped_groups", "tok/s"]
        logger.log(update, metrics, console=console, bar=bar)
        if d.master and cfg.log_samples_every and update % cfg.log_samples_every == 0:
            log_samples(samples_path, update, batch_prompts, rollout.texts, r["raw_scores"], kl_per_response, gold, bar)

        # ---- 7. the held-out prompts: over-optimisation shows here first
        if eval_prompts and update % cfg.eval_every == 0:
            best = evaluation.log(update, logger, bar, best, best_key)
            if cfg.max_kl and evaluation.last["eval/kl_exact"] > cfg.max_kl:
                where = (f"the best checkpoint so far is {cfg.out}/best.pt (update {best[1]}, {best_key} {best[0]:.3f})"
                         if cfg.keep_best else f"the last checkpoint is {cfg.out}/ckpt.pt (update {update})")
                stop = f"stopped at update {update}: the held-out KL per response passed --max_kl {cfg.max_kl}; {where}"
                print0(stop)
                save(update)
                break
        if cfg.save_every and update % cfg.save_every == 0 and update < cfg.updates:
            save(update)

    # ---- save
    if stop is None:
        save(cfg.updates)
    result = stop or f"{cfg.updates} updates in {time.time() - t_start:.0f}s"
    if cfg.keep_best and best is not None:
        result += f" | best held-out {best_key} {best[0]:.3f} at update {best[1]}: {cfg.out}/best.pt"
    saved = f"{cfg.out}/ckpt.pt (policy)" + (f" and {cfg.out}/value.pt" if m.value else "")
    print0(done_line(cfg.advantage, stats, result, saved, d.device))
    cleanup(d)


# ----------------------------------------------------------------------------- 3. scoring

@torch.no_grad()
def score_rollout(cfg, m, rollout, batch_prompts, prompt_ids, batch_idx, generator, chunk):
    """Everything the losses need from the finished rollout: no dropout, no gradient, in
    minibatch-sized chunks, exactly as the first training minibatch will see it (so its ratio
    is exactly 1): old and reference log-probs, old values (gae), the score and its parts."""
    out = defaultdict(list)
    for s in range(0, rollout.seq.size(0), chunk):
        c = rollout[s:s + chunk]
        out["old_logprobs"].append(response_logprobs(m.policy, c, cfg.temperature))
        out["ref_logprobs"].append(response_logprobs(m.ref, c, cfg.temperature))
        if m.value is not None:
            out["old_values"].append(response_values(m.value, c))
    r = {k: torch.cat(v) for k, v in out.items()}
    # the exact KL over the whole vocabulary (kernels.kl_full) on the first chunk, beside the estimate in use
    r["kl_exact"] = exact_kl(m.policy, m.ref, rollout[0:chunk], cfg.temperature, chunk)
    baseline = reference_scores(cfg, m, [prompt_ids[i] for i in batch_idx], generator, chunk) if m.ref_sampler else None
    r["raw_scores"], r["parts"] = rollout_score(rollout, batch_prompts, m.reward_models, m.reward_fn, chunk=chunk,
                                                uncertainty_coef=cfg.uncertainty_coef,
                                                reward_fn_weight=cfg.reward_fn_weight, baseline=baseline)
    r["scores"] = r["raw_scores"] - cfg.missing_eos_penalty * (~rollout.ended).float()  # N+ details: punish rambling on
    return r


@torch.no_grad()
def reference_scores(cfg, m, prompt_ids, generator, chunk):
    """(K, B) every member's score of the reference policy's own response to each prompt: the
    baseline that the ensemble's spread is measured against (--spread_vs_ref)."""
    rollout = generate(m.ref_sampler, prompt_ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                       generator=generator)
    return member_scores(m.reward_models, rollout.seq, rollout.seq_mask, chunk)


# ----------------------------------------------------------------------------- 4. advantages

@torch.no_grad()
def advantages(cfg, d, r, mask, kl_coef):
    """{advantages, returns, kl, loss_mask, dropped_groups} for the estimator in use. advantages
    are (B, N) per token for gae and reinforce_pp, (B,) per response for grpo and rloo."""
    in_reward = kl_coef if cfg.kl_in == "reward" else 0.0
    critic = r["old_values"] if "old_values" in r else torch.zeros_like(mask)
    scores, keep = r["scores"], None  # keep: (B,) False for a group whose scores are all equal, dropped
    if cfg.advantage == "reinforce_pp" and cfg.group_size > 1:
        # REINFORCE++ with K > 1: each score less its group's mean first. A reward model trained on
        # rankings leaves every prompt its own constant, which is noise to a batch-wide baseline.
        scores, keep = group_advantages(scores, cfg.group_size, "mean")
    # gae: KL-shaped rewards and GAE in one fused op. reinforce_pp: the same op with no critic and
    # lam = 1, which makes the advantage the return itself (REINFORCE++).
    adv, returns, kl = ppo_advantages(scores, r["old_logprobs"], r["ref_logprobs"], critic, mask, kl_coef=in_reward,
                                      gamma=cfg.gamma, lam=cfg.lam if cfg.advantage == "gae" else 1.0,
                                      kl_estimator=cfg.kl_estimator)
    out = {"returns": returns, "kl": kl}
    if cfg.advantage == "gae":
        out["advantages"] = masked_whiten(adv, mask, d) if cfg.whiten_advantages else adv
    elif cfg.advantage == "reinforce_pp":  # normalised over the global batch: the baseline of REINFORCE++
        out["advantages"] = masked_whiten(adv, mask, d)
    else:  # grpo / rloo: one reward per response, compared within its group
        rewards = r["scores"] - in_reward * (kl * mask).sum(1)
        out["advantages"], keep = group_advantages(rewards, cfg.group_size, cfg.advantage)
    out["loss_mask"] = mask if keep is None else mask * keep[:, None]
    out["dropped_groups"] = 0.0 if keep is None else (~keep).float().sum().item() / cfg.group_size
    return out


# ----------------------------------------------------------------------------- 5. training

def train_on_rollout(cfg, d, rollout, r, ddp_policy, ddp_value, trained, optimizer, gen, chunk, kl_coef):
    """cfg.ppo_epochs passes over the rollout in minibatches: the clipped policy loss (plus the
    KL term with --kl_in loss, plus the clipped value loss for gae). Returns each step's stats."""
    ddp_policy.train()
    if ddp_value is not None:
        ddp_value.train()
    step_stats, B = [], rollout.seq.size(0)
    for epoch in range(cfg.ppo_epochs):
        # epoch 0 in rollout order (already a random sample of prompts), later ones shuffled
        perm = torch.arange(B) if epoch == 0 else torch.randperm(B, generator=gen)
        for s in range(0, B, chunk):
            mb = perm[s:s + chunk].to(rollout.seq.device)
            mini, mask = rollout[mb], r["loss_mask"][mb]
            logprobs, entropy = response_logprobs(ddp_policy, mini, cfg.temperature, return_entropy=True)
            loss, stats = policy_loss(logprobs, r["old_logprobs"][mb], r["advantages"][mb], mask, cfg.cliprange,
                                      cfg.loss_agg, cfg.max_new_tokens)
            stats.update({"ppo/policy_loss": loss.detach(), "objective/entropy": masked_mean(entropy.detach(), mini.mask)})
            if cfg.kl_in == "loss":
                kl_term = aggregate(kl_penalty(logprobs, r["ref_logprobs"][mb], cfg.kl_estimator), mask, cfg.loss_agg,
                                    cfg.max_new_tokens)
                loss = loss + kl_coef * kl_term
                stats["ppo/kl_loss"] = kl_term.detach()
            if ddp_value is not None:
                vf_loss, vf_stats = value_loss(response_values(ddp_value, mini), r["old_values"][mb], r["returns"][mb],
                                               mask, cfg.cliprange_value)
                loss = loss + cfg.vf_coef * vf_loss
                stats.update({"ppo/value_loss": vf_loss.detach(), **vf_stats})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip)
            optimizer.step()
            if epoch == 0 and s == 0:  # nothing has changed yet: the ratio is exactly 1
                stats["ppo/first_ratio_error"] = (logprobs - r["old_logprobs"][mb]).exp().sub(1).abs().max().detach()
            step_stats.append(stats)
    return step_stats


# ----------------------------------------------------------------------------- logging

def update_metrics(cfg, d, rollout, r, step_stats, kl_per_response, mean_kl, kl_coef, gold):
    """One update's metrics, averaged over processes."""
    mask, scores = rollout.mask, r["scores"]
    metrics = {"objective/score": r["raw_scores"].mean().item(), f"objective/kl_{cfg.kl_estimator}": mean_kl,
               "objective/kl_exact": r["kl_exact"].mean().item(),
               "objective/rlhf_reward": (scores - kl_coef * kl_per_response).mean().item(),
               **{f"objective/{k}": v.mean().item() for k, v in r["parts"].items()},
               **{k: torch.stack([s[k] for s in step_stats if k in s]).float().mean().item() for k in step_stats[0]},
               "rollout/resp_len": mask.sum(1).mean().item(), "rollout/eos_rate": rollout.ended.float().mean().item()}
    if "old_values" in r:
        returns, residual = r["returns"], r["returns"] - r["old_values"]
        var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
        var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
        metrics["val/explained_var"] = (1 - var_residual / var_returns.clamp(min=1e-8)).item()
    if cfg.group_size > 1 and cfg.advantage != "gae":
        metrics["rollout/dropped_groups"] = r["dropped_groups"]
    if gold:
        metrics["gold"] = sum(gold) / len(gold)
    metrics = {k: all_reduce_mean(v, d) for k, v in metrics.items()}
    if "rollout/dropped_groups" in metrics:
        metrics["rollout/dropped_groups"] *= d.world_size  # a count over every process, not a mean
    metrics["kl_coef"] = kl_coef
    return metrics


def log_samples(path, update, prompts, texts, scores, kl_per_response, gold, bar):
    """A few of the rollout's responses to OUT/samples.jsonl, and the first on the console."""
    rows = [{"step": update, "prompt": prompts[j], "response": texts[j], "score": scores[j].item(),
             "kl": kl_per_response[j].item(), **({"gold": gold[j]} if gold else {})} for j in range(min(4, len(texts)))]
    with open(path, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    bar.write(f"sample | {rows[0]['prompt'][-60:]!r} -> {rows[0]['response'][:100]!r} | score {rows[0]['score']:.3f}"
              f" | kl {rows[0]['kl']:.2f}" + (f" | gold {rows[0]['gold']:.2f}" if gold else ""))


# ----------------------------------------------------------------------------- 7. evaluation

class Evaluation:
    """The policy on the held-out prompts, each process answering its share: the score it
    optimises (and its parts), the exact KL to the reference per response (over the whole
    vocabulary, kernels.kl_full), the response length, and the judge's or gold score. The
    samples are drawn with the same seed every time, so a curve shows the policy, not the noise.
    baseline (K, mine): the members' scores of the reference's responses (--spread_vs_ref)."""

    def __init__(self, cfg, d, m, prompts, prompt_ids, task, chunk, baseline):
        self.cfg, self.d, self.m, self.prompts, self.prompt_ids = cfg, d, m, prompts, prompt_ids
        self.task, self.chunk, self.baseline, self.last = task, chunk, baseline, None

    @torch.no_grad()
    def metrics(self):
        cfg, d, m = self.cfg, self.d, self.m
        m.sampler.load(m.policy)
        generator = torch.Generator(device=d.device).manual_seed(cfg.seed + 1 + d.rank)
        mine = list(range(d.rank, len(self.prompt_ids), d.world_size))
        prompts = [self.prompts[i] for i in mine]
        rollout = generate(m.sampler, [self.prompt_ids[i] for i in mine], max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, generator=generator)
        score, parts = rollout_score(rollout, prompts, m.reward_models, m.reward_fn, chunk=self.chunk, baseline=self.baseline,
                                     uncertainty_coef=cfg.uncertainty_coef, reward_fn_weight=cfg.reward_fn_weight)
        sums = {"eval/score": score.sum(), **{f"eval/{k}": v.sum() for k, v in parts.items()},
                "eval/kl_exact": exact_kl(m.policy, m.ref, rollout, cfg.temperature, self.chunk).sum(),
                "eval/resp_len": rollout.mask.sum()}
        if m.judge is not None:
            sums["eval/judge"] = sum(m.judge(prompts, rollout.texts))
        if self.task is not None:
            sums["eval/gold"] = sum(self.task.gold(prompts, rollout.texts))
        t = torch.tensor([*sums.values(), len(mine)], dtype=torch.float64, device=d.device)
        if d.ddp:
            dist.all_reduce(t)
        return {k: (v / t[-1]).item() for k, v in zip(sums, t)}

    def log(self, update, logger, bar, best, best_key):
        """Log eval/* at this update; keep OUT/best.pt with --keep_best. Returns the best (score, update)."""
        self.last = metrics = self.metrics()
        logger.log(update, metrics, bar=bar)
        if best is None or metrics[best_key] > best[0]:
            best = (metrics[best_key], update)
            if self.cfg.keep_best and self.d.master:
                save_checkpoint(f"{self.cfg.out}/best.pt", self.m.policy, kind="policy", config=self.cfg, step=update,
                                **metrics)
        return best


if __name__ == "__main__":
    run_main(main)
