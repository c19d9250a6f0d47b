"""
Direct preference optimisation: the policy learns from the rankings themselves, with no reward
model and no sampling (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model
is Secretly a Reward Model"). For a pair (chosen y_w, rejected y_l) of one prompt, with
h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)] (sums over the response tokens):

    sigmoid (DPO, eq. 7):       -log sigmoid(beta h)
    label smoothing eps:        -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
                                (conservative DPO, for labels flipped with probability eps)
    ipo (Azar et al. 2023):     (h - 1 / (2 beta))^2

beta * (log pi(y) - log ref(y)) is the implicit reward of y: logged for chosen and rejected. As
in reward.py, every pair a K-way ranking implies counts, averaged per prompt, so a prompt with
K = 9 does not outweigh one with K = 2. The frozen reference's log-probs are computed once,
before training.

    python dpo.py                                      # built-in task: out/sft's samples, ranked by the simulated raters
    python dpo.py --data rankings.jsonl --init out/sft/ckpt.pt --out out/dpo
    python dpo.py --data round2.jsonl --init out/dpo/ckpt.pt --ref out/sft/ckpt.pt --out out/round2/dpo
    torchrun --nproc_per_node=2 dpo.py
    python dpo.py --save_every 20 ...; python dpo.py --save_every 20 ... --resume true   # after a crash

Data: rankings JSONL {prompt, responses, ranking}; preference pairs {prompt, chosen, rejected}
and HH-RLHF {chosen, rejected} files work as they are. The result is a policy checkpoint like
sft.py's: eval.py, ppo.py and dpo.py take it with --init.
"""

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common import Batches, Run, RunConfig, all_reduce_mean, apply_lora, check, check_out, check_positive, check_tokenizers, cleanup, \
    compute_dtype, done_line, load_model, lr_at, make_optimizer, micro_batches, parse_config, print0, run_main, setup, \
    token_batches
from data.tasks import from_spec, task_of
from data.formats import load_rankings
from data.tokenizer import get_tokenizer, ranking_data, use_chat_template
from losses import best_nll, dpo_loss
from model import Reference, Sampler
from rollout import encode_prompts, exact_kl, generate, sequence_logprobs, task_rankings


@dataclass
class Config(RunConfig):
    data: str = "task"  # rankings / preference pairs JSONL (.gz too), as reward.py reads them; "task" ("task:sort", ...): --init's samples ranked by the task's simulated raters
    task_prompts: int = 2000  # --data task: how many train prompts to sample and rank
    val_data: str = ""  # held-out rankings; default: the prompts of --data whose hash falls in val_frac
    val_frac: float = 0.1  # share of prompts held out when there is no --val_data
    init: str = "out/sft/ckpt.pt"  # the policy to start from: an SFT checkpoint, or a DPO/PPO one in a later round
    ref: str = ""  # the frozen reference; default: --init (a later round starts --init from its last policy and keeps SFT here)
    out: str = "out/dpo"  # output directory: ckpt.pt, metrics.jsonl
    loss: str = "sigmoid"  # sigmoid (DPO) or ipo
    beta: float = 0.1  # strength of the pull to the reference (Rafailov et al.'s default; smaller lets the policy drift further)
    label_smoothing: float = 0.0  # sigmoid loss: the assumed chance that a label is flipped (conservative DPO; 0: plain DPO)
    nll_coef: float = 1.0  # weight of a per-token SFT loss on each prompt's best responses (RPO, Pang et al. 2024, their 1; Llama 3): plain DPO lowers the chosen responses' likelihood too, only the rejected faster (Pal et al. 2024), which drifts off what the data showed to be right; 0: plain DPO
    batch_size: int = 32  # rankings (prompts) per optimizer step, over all processes
    micro_batch_size: int = 0  # rankings per forward pass per process (0: batch_size / processes; less accumulates gradients)
    epochs: int = 4  # passes over the training rankings (4, not 2, chosen on the task suite: benchmarks/suite.md; past a few the margins grow, held-out accuracy does not)
    lr: float = 1e-4  # peak learning rate: a tenth or less of SFT's, as in the DPO papers, since the policy must stay near its reference
    warmup_steps: int = 10  # learning-rate warmup
    weight_decay: float = 0.0  # AdamW weight decay on matrices (none: the reference term is the regulariser)
    grad_clip: float = 1.0  # max gradient norm
    fused_lm_head: bool = True  # log-probs straight from hidden states (kernels.linear_logprobs; false: logits, then token_logprobs)
    eval_every: int = 50  # steps between validations (pair accuracy, implicit rewards, KL to the reference)
    kl_prompts: int = 64  # held-out prompts the policy answers to measure its exact KL to the reference
    max_new_tokens: int = 40  # longest sampled response when measuring the KL

    def check(self):
        check_positive(self, "batch_size", "epochs", "eval_every", "task_prompts", "kl_prompts", "max_new_tokens")
        check(self.loss in ("sigmoid", "ipo"), f"--loss {self.loss}: expected sigmoid or ipo")
        check(self.beta > 0, f"--beta must be above 0, not {self.beta}")
        check(not (self.loss == "ipo" and self.label_smoothing), "--label_smoothing applies to the sigmoid loss only, not to --loss ipo")


def main():
    # ---- config and setup
    cfg = parse_config(Config)
    d = setup(cfg.device, cfg.seed)
    micro, accum = micro_batches(cfg.batch_size, cfg.micro_batch_size, d.world_size)
    check_out(cfg)

    # ---- models: the policy, and the frozen reference (--init unless --ref names another)
    model = apply_lora(cfg, load_model(cfg.init, kind="policy", device=d.device, flag="--init"))
    model.fused_lm_head = cfg.fused_lm_head
    if cfg.lora_rank and cfg.ref in ("", cfg.init):  # the policy's base weights, adapters off: no second copy
        ref = Reference(model)
    else:
        ref = load_model(cfg.ref or cfg.init, kind="policy", device=d.device, flag="--ref").eval().requires_grad_(False)
    check_tokenizers({cfg.init: model, cfg.ref or cfg.init: ref})
    enc = get_tokenizer(model.config.tokenizer)
    use_chat_template(enc, cfg.chat_template)
    eot, block = enc.eot_token, model.config.block_size
    print0(f"model: {model.num_params() / 1e6:.2f}M parameters from {cfg.init}, reference {cfg.ref or cfg.init}, "
           f"device {d.device}, {d.world_size} process(es)")

    # ---- data: rankings -> ([(prompt_ids, response_ids)], pairs, row), split by prompt as reward.py does
    stats = {}
    task = from_spec(cfg.data)
    if task:
        rows = task_rankings(model, task, cfg.task_prompts, cfg.seed)
        stats["rows"] = len(rows)
    else:
        rows = load_rankings(cfg.data, skip_bad_lines=cfg.skip_bad_lines, stats=stats)
    train, val, line = ranking_data(cfg, rows, enc, block, stats, stage="DPO", split=True)
    print0(line)
    steps = cfg.epochs * (len(train) // cfg.batch_size)
    max_tokens = micro * 4 * block  # scoring batches: about a training micro-batch's tokens

    # ---- the frozen reference's log-probs, once
    t0 = time.time()
    ref_train = ranking_logprobs(ref, train, eot, d.device, max_tokens)
    ref_val = ranking_logprobs(ref, val, eot, d.device, max_tokens)
    print0(f"reference log-probs of {sum(len(x) for x in ref_train) + sum(len(x) for x in ref_val)} responses "
           f"in {time.time() - t0:.1f}s")
    kl_prompts = list(dict.fromkeys(row["prompt"] for _, _, row in val))[:cfg.kl_prompts]

    # ---- train
    gen = torch.Generator().manual_seed(cfg.seed)  # the same on every process: they agree on the batch
    run = Run(cfg, d, model, make_optimizer(model, cfg.lr, cfg.weight_decay, d.device),
              Batches(len(train), cfg.batch_size, gen, d), kind="policy", step_field="epochs", generators=[gen])
    start = run.resume()
    optimizer, logger = run.optimizer, run.logger
    metrics = {}
    if start == 0 and d.master:  # the policy is the reference here: every implicit reward is 0
        metrics = evaluate(cfg, model, ref, val, ref_val, kl_prompts, max_tokens)
        logger.log(0, metrics)
    model.train()
    t1, tokens = time.time(), 0
    bar = tqdm(range(start + 1, steps + 1), desc="dpo", disable=None if d.master else True, dynamic_ncols=True,
               initial=start, total=steps)
    for step in bar:
        mine = run.batches.next()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, steps)
        loss_sum, nll_sum, chosen, rejected = 0.0, 0.0, [], []
        for j in range(accum):
            idx = mine[j * micro:(j + 1) * micro]
            chunk = [train[i] for i in idx]
            if d.ddp:  # synchronise gradients only on the last micro-batch
                run.ddp_model.require_backward_grad_sync = j == accum - 1
            logprobs, lengths = sequence_logprobs(run.ddp_model, [ex for examples, _, _ in chunk for ex in examples], eot, d.device)
            tokens += int(lengths.sum())
            loss, c, r = dpo_loss(logprobs - torch.cat([ref_train[i] for i in idx]), chunk, cfg.beta, cfg.loss, cfg.label_smoothing)
            loss_sum += loss.item() / accum  # logged as "loss": the DPO loss alone, as val/loss is
            if cfg.nll_coef:
                nll = best_nll(logprobs, lengths, chunk)
                loss = loss + cfg.nll_coef * nll
                nll_sum += nll.item() / accum
            (loss / accum).backward()
            chosen.append(c)
            rejected.append(r)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = pair_stats("", all_reduce_mean(loss_sum, d), torch.cat(chosen), torch.cat(rejected), d)
        metrics.update({"grad_norm": grad_norm.item(), "lr": optimizer.param_groups[0]["lr"],
                        "tok/s": round(all_reduce_mean(tokens, d) * d.world_size / (time.time() - t1))})
        if cfg.nll_coef:
            metrics["nll"] = all_reduce_mean(nll_sum, d)
        if (step % cfg.eval_every == 0 or step == steps) and d.master:
            metrics.update(evaluate(cfg, model, ref, val, ref_val, kl_prompts, max_tokens))
            logger.log(step, metrics, console=["loss", "rewards/margin", "accuracy", "val/loss", "val/accuracy",
                                               "val/rewards/margin", "val/kl_exact", "val/gold"], bar=bar)
        elif d.master:
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            logger.log(step, metrics, console=[])
        if cfg.save_every and step % cfg.save_every == 0 and step < steps:
            run.save(step)

    # ---- save
    if "val/accuracy" not in metrics and d.master:  # resumed at the very end: evaluate what there is
        metrics.update(evaluate(cfg, model, ref, val, ref_val, kl_prompts, max_tokens))
    summary = {k: v for k, v in metrics.items() if k.startswith("val/")}
    run.save(steps, **summary)
    result = " | ".join(f"{k} {v:.4g}" for k, v in summary.items() if k in ("val/accuracy", "val/rewards/margin", "val/kl_exact", "val/gold"))
    print0(done_line("dpo", stats, f"{result} in {time.time() - t0:.0f}s", f"{cfg.out}/ckpt.pt", d.device))
    cleanup(d)


@torch.no_grad()
def ranking_logprobs(model, data, eot, device, max_tokens):
    """sequence_logprobs of every response of every ranking, in eval mode and token-bounded
    batches: one (K,) tensor per ranking. The reference's are computed so once, before training;
    the policy's on held-out rankings the same way, so at step 0 the two agree to the last bit."""
    model.eval()
    flat = [ex for examples, _, _ in data for ex in examples]
    out = torch.cat([sequence_logprobs(model, [flat[i] for i in idx], eot, device)[0]
                     for idx in token_batches([len(p) + len(r) for p, r in flat], max_tokens)])
    return list(out.split([len(examples) for examples, _, _ in data]))


def pair_stats(prefix, loss, chosen, rejected, d=None):
    """Means over every pair (of every process, when d is given) of the implicit rewards, their
    margin, and how often the chosen response's is the higher."""
    sums = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(), torch.tensor(float(len(chosen)))])
    if d is not None:
        sums = all_reduce_mean(sums, d)  # the ratios below are the same with sums or with their means
    c, r, right, n = sums.tolist()
    return {f"{prefix}loss": loss, f"{prefix}rewards/chosen": c / n, f"{prefix}rewards/rejected": r / n,
            f"{prefix}rewards/margin": (c - r) / n, f"{prefix}accuracy": right / n}


@torch.no_grad()
def evaluate(cfg, model, ref, val, ref_val, kl_prompts, max_tokens):
    """Held-out pairs: loss, implicit rewards, accuracy; and the exact KL(policy || reference)
    per response on policy samples of held-out prompts (with the gold score on the built-in task)."""
    device = next(model.parameters()).device
    eot = get_tokenizer(model.config.tokenizer).eot_token
    logprobs = torch.cat(ranking_logprobs(model, val, eot, device, max_tokens))
    loss, chosen, rejected = dpo_loss(logprobs - torch.cat(ref_val), val, cfg.beta, cfg.loss, cfg.label_smoothing)
    metrics = pair_stats("val/", loss.item(), chosen, rejected)
    enc = get_tokenizer(model.config.tokenizer)
    prompt_ids = encode_prompts(enc, kl_prompts, model.config.block_size - cfg.max_new_tokens)
    rollout = generate(Sampler(model, dtype=compute_dtype(device)), prompt_ids, max_new_tokens=cfg.max_new_tokens,
                       generator=torch.Generator(device=device).manual_seed(cfg.seed))
    metrics["val/kl_exact"] = exact_kl(model, ref, rollout, 1.0, len(kl_prompts)).mean().item()
    task = task_of(kl_prompts)
    if task is not None:
        metrics["val/gold"] = sum(task.gold(kl_prompts, rollout.texts)) / len(kl_prompts)
    model.train()
    return metrics


if __name__ == "__main__":
    run_main(main)
