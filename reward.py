"""
Stage 2, the reward model: the SFT model's trunk with a scalar head, trained so that the
response people ranked higher scores higher. For a ranking of K responses every pair it implies
(better, worse) contributes the Bradley-Terry loss -log sigmoid(r_better - r_worse); all the
pairs of one prompt sit in the same batch element and are averaged, so a prompt with K = 9 does
not outweigh one with K = 2 (InstructGPT, section 3.5). Tied responses make no pair. The score of
a response is the head's output on its last token (the EOS).

After training the reward model is normalised (--normalize): a bias on the head makes the SFT
model's own samples score 0 on average, so PPO's rewards start centred (InstructGPT, section 3.5;
N+ implementation details). The loss cannot see such a shift, so accuracy is unchanged.

    python reward.py                                    # built-in task: SFT samples ranked by the simulated raters
    python reward.py --data rankings.jsonl --init out/sft/ckpt.pt --out out/reward
    torchrun --nproc_per_node=2 reward.py

Data: rankings JSONL {prompt, responses, ranking, rater?}; preference pairs {prompt, chosen,
rejected} and HH-RLHF {chosen, rejected} files work as they are.
"""

import hashlib
import itertools
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import CheckpointError, Logger, all_reduce_mean, autocast, cleanup, load_model, lr_at, make_optimizer, micro_batches, parse_config, \
    print0, run_main, save_checkpoint, setup
from data import task
from data.formats import load_rankings, ranking_pairs
from data.tokenizer import encode_examples, get_tokenizer, pad
from sample import sample_responses


@dataclass
class Config:
    data: str = "task"  # rankings / preference pairs JSONL (.gz too), or "task": SFT samples ranked by the simulated raters
    val_data: str = ""  # held-out rankings; default: the prompts of --data whose hash falls in val_frac
    task_prompts: int = 2000  # --data task: how many train prompts to sample and rank
    val_frac: float = 0.1  # share of prompts held out when there is no --val_data
    init: str = "out/sft/ckpt.pt"  # SFT checkpoint: the trunk the reward model starts from
    out: str = "out/reward"  # output directory: ckpt.pt, metrics.jsonl
    batch_size: int = 32  # rankings (prompts) per optimizer step, over all processes
    micro_batch_size: int = 0  # rankings per forward pass per process (0: batch_size / processes; less accumulates gradients)
    epochs: int = 3  # passes over the training rankings
    lr: float = 1e-3  # peak learning rate (linear warmup, cosine decay)
    warmup_steps: int = 10  # learning-rate warmup
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # max gradient norm
    eval_every: int = 50  # steps between validations
    normalize: bool = True  # after training, shift the head's bias so SFT samples score 0 on average
    normalize_prompts: int = 256  # training prompts whose SFT samples set that mean
    skip_bad_lines: bool = False  # skip malformed data lines (counted) instead of stopping
    seed: int = 0  # same seed, same numbers (on CPU)
    device: str = ""  # cuda / cpu / cuda:1; default: cuda if available


def encode_rankings(enc, rows, block_size, stats):
    """Rankings -> [(sequences, pairs)]: every response as prompt + response + EOS token ids,
    and the (better, worse) index pairs its ranking implies. A ranking with a response that does
    not fit the context, or with no pair at all (all tied), is dropped and counted."""
    out = []
    for row in rows:
        examples = [{"prompt": row["prompt"], "response": r} for r in row["responses"]]
        counts = {}
        seqs = encode_examples(enc, examples, block_size, counts)
        stats["truncated"] = stats.get("truncated", 0) + counts.get("truncated", 0)
        pairs = ranking_pairs(row["ranking"])
        if len(seqs) < len(examples) or not pairs:
            stats["dropped"] = stats.get("dropped", 0) + 1
            continue
        out.append(([p + r for p, r in seqs], pairs, row))
    return out


def last_token_scores(model, ids, mask):
    """The scalar head on each sequence's last real token (the EOS of a finished response), for
    left- or right-padded (B, T) ids and mask. Returns (B,) fp32."""
    with autocast(ids.device):
        values = model(ids, mask).float()  # (B, T)
    last = mask.size(1) - 1 - mask.flip(1).argmax(1)  # column of the last 1 in each row
    return values[torch.arange(ids.size(0), device=ids.device), last]


def score_sequences(model, seqs, eot, device):
    """Reward of each token-id list, as last_token_scores. Returns (N,) fp32."""
    ids, mask = pad(seqs, eot)  # right-padded (N, T)
    return last_token_scores(model, ids.to(device), mask.to(device))


def ranking_loss(rewards, batch):
    """Bradley-Terry over every implied pair, averaged per prompt, then over prompts.
    rewards: (N,) for the batch's sequences in order. Returns the loss and, for logging, every
    pair's margin r_better - r_worse."""
    losses, margins, start = [], [], 0
    for seqs, pairs, _ in batch:
        r = rewards[start:start + len(seqs)]
        start += len(seqs)
        better, worse = torch.tensor(pairs, device=rewards.device).T
        margin = r[better] - r[worse]
        losses.append(-F.logsigmoid(margin).mean())
        margins.append(margin.detach())
    return torch.stack(losses).mean(), torch.cat(margins)


def rater_agreement(rows):
    """For each ranking, one label per pair it implies (in ranking_pairs order): True when other
    raters ranked the same prompt and responses and every one who ordered the pair agreed, False
    when one ordered it the other way, None when no other rater ordered it."""
    others = defaultdict(list)  # (prompt, responses) -> [(rater, set of (better, worse))]
    for row in rows:
        others[(row["prompt"], tuple(row["responses"]))].append((row["rater"], set(ranking_pairs(row["ranking"]))))
    labels = []
    for row in rows:
        theirs = [pairs for rater, pairs in others[(row["prompt"], tuple(row["responses"]))] if rater != row["rater"]]
        labels.append([])
        for better, worse in ranking_pairs(row["ranking"]):
            if any((worse, better) in pairs for pairs in theirs):
                labels[-1].append(False)
            else:
                labels[-1].append(True if any((better, worse) in pairs for pairs in theirs) else None)
    return labels


@torch.no_grad()
def validate(model, val, eot, device, batch_size=64):
    """Accuracy and mean margin on held-out pairs; for the built-in task also the accuracy
    against the gold ordering (every pair of responses whose gold scores differ)."""
    model.eval()
    margins, gold_right, gold_total = [], 0, 0
    for i in range(0, len(val), batch_size):
        batch = val[i:i + batch_size]
        rewards = score_sequences(model, [s for seqs, _, _ in batch for s in seqs], eot, device)
        margins.append(ranking_loss(rewards, batch)[1])
        start = 0
        for seqs, _, row in batch:
            r, start = rewards[start:start + len(seqs)].tolist(), start + len(seqs)
            if not task.is_task_prompt(row["prompt"]):
                continue
            gold = [task.gold_score(row["prompt"], resp) for resp in row["responses"]]
            for a, b in itertools.combinations(range(len(gold)), 2):
                if gold[a] != gold[b]:
                    gold_total += 1
                    gold_right += (gold[a] > gold[b]) == (r[a] > r[b])
    model.train()
    margins = torch.cat(margins)
    metrics = {"val/accuracy": (margins > 0).float().mean().item(), "val/margin": margins.mean().item()}
    if gold_total:
        metrics["val/gold_accuracy"] = gold_right / gold_total
        metrics["val/gold_pairs"] = gold_total
    # Split by whether the raters of a prompt agreed on a pair (only where 2+ raters ranked it).
    # Every rater's label counts, as in val/accuracy, so on a pair two raters split the model is
    # right exactly once: there the margin tells more (a calibrated model keeps it small).
    agreed = [a for labels in rater_agreement([row for _, _, row in val]) for a in labels]  # aligned with margins
    for name, want in (("agree", True), ("disagree", False)):
        sel = torch.tensor([a is want for a in agreed], device=margins.device)
        if sel.any():
            metrics[f"val/accuracy_raters_{name}"] = (margins[sel] > 0).float().mean().item()
            metrics[f"val/abs_margin_raters_{name}"] = margins[sel].abs().mean().item()
    return metrics


@torch.no_grad()
def normalize_reward(model, policy, prompts, device, seed=0, batch_size=64):
    """Subtract from the head's bias the mean score of the policy's samples (one per prompt),
    so they score 0 on average. Returns that mean before and after."""
    enc = get_tokenizer(model.config.tokenizer)
    responses = sample_responses(policy, prompts, k=1, seed=seed)  # PPO's defaults: 40 tokens, T = 1
    examples = [{"prompt": p, "response": r[0]} for p, r in zip(prompts, responses)]
    seqs = [p + r for p, r in encode_examples(enc, examples, model.config.block_size)]
    model.eval()

    def mean_score():
        return torch.cat([score_sequences(model, seqs[i:i + batch_size], enc.eot_token, device)
                          for i in range(0, len(seqs), batch_size)]).mean().item()

    before = mean_score()
    model.score.bias -= before
    after = mean_score()
    model.train()
    return before, after


def held_out(prompt, frac):
    return int(hashlib.md5(prompt.encode()).hexdigest(), 16) % 1000 < frac * 1000


def main():
    cfg = parse_config(Config)
    d = setup(cfg.device, cfg.seed)
    cfg.micro_batch_size, accum = micro_batches(cfg.batch_size, cfg.micro_batch_size, d.world_size)

    # ---- model: the SFT trunk with a new scalar head
    model = load_model(cfg.init, kind=("policy", "reward"), head="scalar", device=d.device)
    enc = get_tokenizer(model.config.tokenizer)
    eot = enc.eot_token
    print0(f"reward model: {model.num_params() / 1e6:.2f}M parameters from {cfg.init}, device {d.device}, {d.world_size} process(es)")

    # ---- data: rankings -> (sequences, pairs)
    stats = {}
    if cfg.data == "task":  # steps 2-3 of train.sh in one: K samples per prompt, ranked by the simulated raters
        policy = load_model(cfg.init, kind="policy", device=d.device)
        prompts = task.prompts("train")[:cfg.task_prompts]
        rows = task.rate([{"prompt": p, "responses": r} for p, r in zip(prompts, sample_responses(policy, prompts, k=4, seed=cfg.seed))],
                         seed=cfg.seed)
    else:
        rows = load_rankings(cfg.data, skip_bad_lines=cfg.skip_bad_lines, stats=stats)
    if cfg.val_data:
        train_rows, val_rows = rows, load_rankings(cfg.val_data, skip_bad_lines=cfg.skip_bad_lines, stats=stats)
    else:  # split by prompt, so no held-out prompt was seen in training (also with two raters)
        train_rows = [r for r in rows if not held_out(r["prompt"], cfg.val_frac)]
        val_rows = [r for r in rows if held_out(r["prompt"], cfg.val_frac)]
    block = model.config.block_size
    train, val = encode_rankings(enc, train_rows, block, stats), encode_rankings(enc, val_rows, block, stats)
    n_pairs = sum(len(p) for _, p, _ in train)
    print0(f"data: {len(train)} train rankings ({n_pairs} pairs) / {len(val)} val rankings; "
           f"{stats.get('truncated', 0)} responses' prompts cut from the left, {stats.get('dropped', 0)} rankings dropped "
           f"(a response longer than {block} tokens, or all tied), {stats.get('bad_lines', 0)} bad lines skipped")
    assert train and val, "need both training and held-out rankings"

    # ---- train
    steps = cfg.epochs * (len(train) // cfg.batch_size)
    assert steps > 0, f"{len(train)} rankings is less than one batch of {cfg.batch_size}"
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, d.device)
    ddp_model = DDP(model) if d.ddp else model
    gen = torch.Generator().manual_seed(cfg.seed)
    logger = Logger(cfg.out, d.master)
    t0 = time.time()
    order, cursor = torch.randperm(len(train), generator=gen), 0
    metrics = validate(model, val, eot, d.device)
    logger.log(0, metrics)
    bar = tqdm(range(1, steps + 1), desc="reward", disable=None if d.master else True, dynamic_ncols=True)
    for step in bar:
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(train), generator=gen), 0
        global_idx = order[cursor:cursor + cfg.batch_size]
        cursor += cfg.batch_size
        mine = global_idx[d.rank * cfg.micro_batch_size * accum:(d.rank + 1) * cfg.micro_batch_size * accum].tolist()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, steps)
        loss_sum, margins = 0.0, []
        for k in range(accum):
            micro = [train[i] for i in mine[k * cfg.micro_batch_size:(k + 1) * cfg.micro_batch_size]]
            if d.ddp:
                ddp_model.require_backward_grad_sync = k == accum - 1
            rewards = score_sequences(ddp_model, [s for seqs, _, _ in micro for s in seqs], eot, d.device)
            loss, m = ranking_loss(rewards, micro)
            (loss / accum).backward()
            loss_sum += loss.item() / accum
            margins.append(m)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        margins = torch.cat(margins)
        metrics = {"loss": all_reduce_mean(loss_sum, d), "accuracy": all_reduce_mean((margins > 0).float().mean().item(), d),
                   "grad_norm": grad_norm.item(), "lr": optimizer.param_groups[0]["lr"]}
        if step % cfg.eval_every == 0 or step == steps:
            metrics.update(validate(model, val, eot, d.device))
            logger.log(step, metrics, bar=bar)
        else:
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            logger.log(step, metrics, console=[])

    summary = {k: v for k, v in metrics.items() if k.startswith("val/")}
    print0("reward done: " + " | ".join(f"{k} {v:.4g}" for k, v in summary.items()) + f" in {time.time() - t0:.0f}s")
    normalized = {}
    if cfg.normalize and d.master:  # only rank 0 saves, so only rank 0 needs the shift
        try:
            policy = load_model(cfg.init, kind="policy", device=d.device)
        except CheckpointError:
            print0(f"normalize: skipped, {cfg.init} is not an SFT (policy) checkpoint to sample from")
        else:
            prompts = list(dict.fromkeys(r["prompt"] for r in train_rows))[:cfg.normalize_prompts]
            before, after = normalize_reward(model, policy, prompts, d.device, seed=cfg.seed)
            normalized = {"normalize/mean_before": before, "normalize/mean_after": after}
            logger.log(steps, normalized)
    if d.master:
        save_checkpoint(f"{cfg.out}/ckpt.pt", model, kind="reward", config=cfg, step=steps, optimizer=optimizer,
                        **summary, **normalized)
        print0(f"saved {cfg.out}/ckpt.pt")
    cleanup(d)


if __name__ == "__main__":
    run_main(main)
