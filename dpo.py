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
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import ConfigError, Logger, all_reduce_mean, autocast, cleanup, done_line, load_model, lr_at, make_optimizer, \
    micro_batches, parse_config, print0, resume_checkpoint, rng_states, run_main, save_checkpoint, set_rng_states, setup, \
    token_batches
from data import task
from data.formats import DataError, load_rankings
from data.tokenizer import get_tokenizer
from reward import encode_rankings, held_out, task_rankings
from sft import demo_batch


@dataclass
class Config:
    data: str = "task"  # rankings / preference pairs JSONL (.gz too), as reward.py reads them; "task": --init's samples ranked by the simulated raters
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
    epochs: int = 2  # passes over the training rankings (DPO overfits the pairs past a few: the margins grow, held-out accuracy does not)
    lr: float = 1e-4  # peak learning rate: a tenth or less of SFT's, as in the DPO papers, since the policy must stay near its reference
    warmup_steps: int = 10  # learning-rate warmup
    weight_decay: float = 0.0  # AdamW weight decay on matrices (none: the reference term is the regulariser)
    grad_clip: float = 1.0  # max gradient norm
    fused_lm_head: bool = True  # log-probs straight from hidden states (kernels.linear_logprobs; false: logits, then token_logprobs)
    eval_every: int = 50  # steps between validations (pair accuracy, implicit rewards, KL to the reference)
    kl_prompts: int = 64  # held-out prompts the policy answers to measure its exact KL to the reference
    max_new_tokens: int = 40  # longest sampled response when measuring the KL
    save_every: int = 0  # steps between checkpoints that --resume can continue from (0: at the end only)
    resume: bool = False  # continue from OUT/ckpt.pt (same settings; only --epochs may change)
    skip_bad_lines: bool = False  # skip malformed data lines (counted) instead of stopping
    seed: int = 0  # same seed, same numbers (on CPU)
    device: str = ""  # cuda / cpu / cuda:1; default: cuda if available


def sequence_logprobs(model, examples, eot, device):
    """Summed log-prob of each response (and its EOS) given its prompt, for [(prompt_ids,
    response_ids)]; right-padded, so no attention mask is needed, and the log-probs come through
    the model's fused lm_head path (kernels.linear_logprobs / token_logprobs). Returns
    (logprobs (N,), response lengths (N,)), fp32."""
    ids, _, loss_mask = demo_batch(examples, eot, device)
    with autocast(ids.device):
        logprobs = model(ids[:, :-1], targets=ids[:, 1:])  # (N, T-1): position t predicts token t+1
    loss_mask = loss_mask[:, 1:]
    return (logprobs * loss_mask).sum(1), loss_mask.sum(1)


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


def dpo_loss(logratios, batch, beta, loss="sigmoid", label_smoothing=0.0):
    """The DPO loss over every pair each ranking implies, averaged per prompt, then over prompts.
    logratios: (N,) log pi(y) - log ref(y) for the batch's responses in order; batch: [(responses,
    pairs, row)]. Returns the loss and, per pair, the implicit rewards beta * logratio of the
    chosen and the rejected response, (P,) each."""
    losses, chosen, rejected, start = [], [], [], 0
    for examples, pairs, _ in batch:
        r = logratios[start:start + len(examples)]
        start += len(examples)
        better, worse = torch.tensor(pairs, device=logratios.device).T
        h = r[better] - r[worse]
        if loss == "sigmoid":
            pair_losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
        elif loss == "ipo":
            pair_losses = (h - 1 / (2 * beta)) ** 2
        else:
            raise ConfigError(f"--loss {loss!r}: expected sigmoid or ipo")
        losses.append(pair_losses.mean())
        chosen.append(beta * r[better].detach())
        rejected.append(beta * r[worse].detach())
    return torch.stack(losses).mean(), torch.cat(chosen), torch.cat(rejected)


def best_nll(logprobs, lengths, batch):
    """The SFT term of RPO: per-token negative log-likelihood of each prompt's best responses
    (the ranking's first group), averaged per prompt, then over prompts."""
    nlls, start = [], 0
    for examples, _, row in batch:
        best = torch.tensor(row["ranking"][0], device=logprobs.device) + start
        start += len(examples)
        nlls.append((-logprobs[best] / lengths[best]).mean())
    return torch.stack(nlls).mean()


def pair_stats(prefix, loss, chosen, rejected, d=None):
    """Means over every pair (of every process, when d is given) of the implicit rewards, their
    margin, and how often the chosen response's is the higher."""
    sums = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(), torch.tensor(float(len(chosen)))])
    if d is not None:
        sums = all_reduce_mean(sums, d)  # the ratios below are the same with sums or with their means
    c, r, right, n = sums.tolist()
    return {f"{prefix}loss": loss, f"{prefix}rewards/chosen": c / n, f"{prefix}rewards/rejected": r / n,
            f"{prefix}rewards/margin": (c - r) / n, f"{prefix}accuracy": right / n}


def main():
    cfg = parse_config(Config)
    d = setup(cfg.device, cfg.seed)
    cfg.micro_batch_size, accum = micro_batches(cfg.batch_size, cfg.micro_batch_size, d.world_size)
    if cfg.loss not in ("sigmoid", "ipo"):
        raise ConfigError(f"--loss {cfg.loss!r}: expected sigmoid or ipo")
    if cfg.loss == "ipo" and cfg.label_smoothing:
        raise ConfigError("--label_smoothing applies to the sigmoid loss only, not to --loss ipo")

    # ---- models: the policy, and the frozen reference (--init unless --ref names another)
    model = load_model(cfg.init, kind="policy", device=d.device)
    model.fused_lm_head = cfg.fused_lm_head
    ref = load_model(cfg.ref or cfg.init, kind="policy", device=d.device).eval().requires_grad_(False)
    if ref.config.tokenizer != model.config.tokenizer:
        raise ConfigError(f"{cfg.ref}: uses tokenizer {ref.config.tokenizer!r} but {cfg.init} uses {model.config.tokenizer!r}")
    enc = get_tokenizer(model.config.tokenizer)
    eot, block = enc.eot_token, model.config.block_size
    print0(f"model: {model.num_params() / 1e6:.2f}M parameters from {cfg.init}, reference {cfg.ref or cfg.init}, "
           f"device {d.device}, {d.world_size} process(es)")

    # ---- data: rankings -> ([(prompt_ids, response_ids)], pairs, row), split by prompt as reward.py does
    stats = {}
    if cfg.data == "task":
        rows = task_rankings(model, cfg.task_prompts, cfg.seed)
        stats["rows"] = len(rows)
    else:
        rows = load_rankings(cfg.data, skip_bad_lines=cfg.skip_bad_lines, stats=stats)
    if cfg.val_data:
        train_rows, val_rows = rows, load_rankings(cfg.val_data, skip_bad_lines=cfg.skip_bad_lines, stats=stats)
    else:
        train_rows = [r for r in rows if not held_out(r["prompt"], cfg.val_frac)]
        val_rows = [r for r in rows if held_out(r["prompt"], cfg.val_frac)]
    train = encode_rankings(enc, train_rows, block, stats, split=True)
    val = encode_rankings(enc, val_rows, block, stats, split=True)
    print0(f"data: {len(train)} train rankings ({sum(len(p) for _, p, _ in train)} pairs) / {len(val)} val rankings; "
           f"{stats.get('truncated', 0)} responses' prompts cut from the left, {stats.get('dropped', 0)} rankings dropped "
           f"(a response longer than {block} tokens, or all tied), {stats.get('bad_lines', 0)} bad lines skipped")
    if not train or not val:
        raise DataError(f"{cfg.val_data if train and cfg.val_data else cfg.data}: {len(train)} rankings to train on and "
                        f"{len(val)} to hold out, but DPO needs both: add rankings (with --val_frac {cfg.val_frac}, about "
                        f"1 prompt in {round(1 / max(cfg.val_frac, 1e-9))} is held out), or give held-out rankings with --val_data")
    steps = cfg.epochs * (len(train) // cfg.batch_size)
    if steps == 0:
        raise DataError(f"{cfg.data}: {len(train)} training rankings, fewer than one batch of --batch_size {cfg.batch_size}; "
                        f"add rankings or lower --batch_size")
    max_tokens = cfg.micro_batch_size * 4 * block  # scoring batches: about a training micro-batch's tokens

    t0 = time.time()
    ref_train = ranking_logprobs(ref, train, eot, d.device, max_tokens)
    ref_val = ranking_logprobs(ref, val, eot, d.device, max_tokens)
    print0(f"reference log-probs of {sum(len(x) for x in ref_train) + sum(len(x) for x in ref_val)} responses "
           f"in {time.time() - t0:.1f}s")
    kl_prompts = list(dict.fromkeys(row["prompt"] for _, _, row in val))[:cfg.kl_prompts]

    @torch.no_grad()
    def evaluate():
        """Held-out pairs: loss, implicit rewards, accuracy; and the exact KL(policy || reference)
        per response on policy samples of held-out prompts (with the gold score on the built-in task)."""
        from eval import Config as EvalConfig, rollouts  # eval.py's sampling and exact KL (kernels.kl_full)
        logprobs = torch.cat(ranking_logprobs(model, val, eot, d.device, max_tokens))
        loss, chosen, rejected = dpo_loss(logprobs - torch.cat(ref_val), val, cfg.beta, cfg.loss, cfg.label_smoothing)
        metrics = pair_stats("val/", loss.item(), chosen, rejected)
        r = rollouts(model, kl_prompts, EvalConfig(max_new_tokens=cfg.max_new_tokens, batch_size=len(kl_prompts)),
                     cfg.seed, ref_model=ref)
        metrics["val/kl"] = sum(r["kl"]) / len(r["kl"])
        if all(task.is_task_prompt(p) for p in kl_prompts):
            metrics["val/gold"] = sum(task.gold_score(p, t) for p, t in zip(kl_prompts, r["responses"])) / len(kl_prompts)
        model.train()
        return metrics

    # ---- train
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, d.device)
    ddp_model = DDP(model) if d.ddp else model
    gen = torch.Generator().manual_seed(cfg.seed)  # the same on every process: they agree on the batch
    order, cursor, start = torch.randperm(len(train), generator=gen), 0, 0
    ckpt = resume_checkpoint(cfg, "policy", "epochs", d)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        order, cursor, start = ckpt["resume"]["order"], ckpt["resume"]["cursor"], ckpt["step"]
        set_rng_states(d, ckpt["resume"]["rng"], gen)
    logger = Logger(cfg.out, d.master, resume_step=start if ckpt else None)

    def save(step, **extra):
        rng = rng_states(d, gen)  # every process takes part
        if d.master:
            save_checkpoint(f"{cfg.out}/ckpt.pt", model, kind="policy", config=cfg, step=step, optimizer=optimizer,
                            resume={"order": order, "cursor": cursor, "rng": rng}, **extra)

    metrics = {}
    if start == 0 and d.master:  # the policy is the reference here: every implicit reward is 0
        metrics = evaluate()
        logger.log(0, metrics)
    model.train()
    t1, tokens = time.time(), 0
    bar = tqdm(range(start + 1, steps + 1), desc="dpo", disable=None if d.master else True, dynamic_ncols=True,
               initial=start, total=steps)
    for step in bar:
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(train), generator=gen), 0
        global_idx = order[cursor:cursor + cfg.batch_size]
        cursor += cfg.batch_size
        mine = global_idx[d.rank * cfg.micro_batch_size * accum:(d.rank + 1) * cfg.micro_batch_size * accum].tolist()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, steps)
        loss_sum, nll_sum, chosen, rejected = 0.0, 0.0, [], []
        for j in range(accum):
            idx = mine[j * cfg.micro_batch_size:(j + 1) * cfg.micro_batch_size]
            micro = [train[i] for i in idx]
            if d.ddp:  # synchronise gradients only on the last micro-batch
                ddp_model.require_backward_grad_sync = j == accum - 1
            logprobs, lengths = sequence_logprobs(ddp_model, [ex for examples, _, _ in micro for ex in examples], eot, d.device)
            tokens += int(lengths.sum())
            loss, c, r = dpo_loss(logprobs - torch.cat([ref_train[i] for i in idx]), micro, cfg.beta, cfg.loss, cfg.label_smoothing)
            loss_sum += loss.item() / accum  # logged as "loss": the DPO loss alone, as val/loss is
            if cfg.nll_coef:
                nll = best_nll(logprobs, lengths, micro)
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
            metrics.update(evaluate())
            logger.log(step, metrics, console=["loss", "rewards/margin", "accuracy", "val/loss", "val/accuracy",
                                               "val/rewards/margin", "val/kl", "val/gold"], bar=bar)
        elif d.master:
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            logger.log(step, metrics, console=[])
        if cfg.save_every and step % cfg.save_every == 0 and step < steps:
            save(step)

    if "val/accuracy" not in metrics and d.master:  # resumed at the very end: validate what there is
        metrics.update(evaluate())
    summary = {k: v for k, v in metrics.items() if k.startswith("val/")}
    save(steps, **summary)
    result = " | ".join(f"{k} {v:.4g}" for k, v in summary.items() if k in ("val/accuracy", "val/rewards/margin", "val/kl", "val/gold"))
    print0(done_line("dpo", stats, f"{result} in {time.time() - t0:.0f}s", f"{cfg.out}/ckpt.pt", d.device))
    cleanup(d)


if __name__ == "__main__":
    run_main(main)
