"""
Stage 1, supervised fine-tuning: teach a GPT to answer prompts by imitating demonstrations.
The loss is next-token cross-entropy on the response tokens only (and the EOS that ends them):
the prompt is given, not learned.

    python sft.py                                   # the built-in task, a new ~1M-parameter model
    python sft.py --data demos.jsonl --init gpt2/ --out out/sft
    torchrun --nproc_per_node=2 sft.py              # same global batch, split over processes
    python sft.py --save_every 100 ...; python sft.py --save_every 100 ... --resume true   # after a crash

Data: JSONL of {prompt, response}; HH-RLHF and TRL prompt/chosen/rejected files work as they
are (the chosen response is the demonstration).
"""

import math
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import Logger, all_reduce_mean, autocast, cleanup, done_line, load_model, lr_at, make_optimizer, micro_batches, \
    parse_config, print0, resume_checkpoint, rng_states, run_main, save_checkpoint, set_rng_states, setup, token_batches
from data import task
from data.formats import DataError, load_demonstrations
from data.tokenizer import encode_examples, get_tokenizer, pad
from model import GPT, GPTConfig


@dataclass
class Config:
    data: str = "task"  # demonstrations JSONL (.gz too), or "task" for the built-in task
    val_data: str = ""  # held-out demonstrations; default: the task's val split, or 5% of --data
    init: str = ""  # checkpoint to start from; empty: a new model of the size below
    out: str = "out/sft"  # output directory: ckpt.pt, metrics.jsonl
    tokenizer: str = "task"  # for a new model: "task" or "gpt2"
    n_layer: int = 4  # new model: transformer blocks
    n_head: int = 4  # new model: attention heads
    n_embd: int = 128  # new model: width
    block_size: int = 64  # new model: longest prompt + response in tokens
    n_demos: int = 6000  # built-in task: how many demonstrations to learn from
    batch_size: int = 32  # sequences per optimizer step, over all processes
    micro_batch_size: int = 0  # sequences per forward pass per process (0: batch_size / processes; less accumulates gradients)
    max_steps: int = 800  # optimizer steps
    lr: float = 2e-3  # peak learning rate (linear warmup, cosine decay to lr/10)
    warmup_steps: int = 50  # learning-rate warmup
    weight_decay: float = 0.1  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # max gradient norm
    fused_lm_head: bool = True  # log-probs straight from hidden states (kernels.linear_logprobs; false: logits, then token_logprobs)
    eval_every: int = 200  # steps between validation losses
    save_every: int = 0  # steps between checkpoints that --resume can continue from (0: at the end only)
    resume: bool = False  # continue from OUT/ckpt.pt (same settings; only --max_steps may change)
    skip_bad_lines: bool = False  # skip malformed data lines (counted) instead of stopping
    seed: int = 0  # same seed, same numbers (on CPU)
    device: str = ""  # cuda / cpu / cuda:1; default: cuda if available


def demo_batch(examples, eot, device):
    """[(prompt_ids, response_ids)] -> right-padded ids, attention mask and loss mask, (B, T) each;
    the loss mask covers the response tokens and their EOS."""
    ids, mask = pad([p + r for p, r in examples], eot)
    loss_mask = torch.zeros_like(mask)
    for i, (p, r) in enumerate(examples):
        loss_mask[i, len(p):len(p) + len(r)] = 1
    return ids.to(device), mask.to(device), loss_mask.to(device)


def nll_sum(model, ids, loss_mask):
    """Summed negative log-likelihood of the loss-masked tokens (the caller divides by the count).
    ids are right-padded, so no mask is needed (causal attention keeps real tokens off the pads),
    and the log-probs come through kernels.token_logprobs: no fp32 (B, T, V) copy of the logits."""
    with autocast(ids.device):
        logprobs = model(ids[:, :-1], targets=ids[:, 1:])  # (B, T-1): position t predicts token t+1
    return -(logprobs * loss_mask[:, 1:]).sum()


def main():
    cfg = parse_config(Config)
    d = setup(cfg.device, cfg.seed)
    cfg.micro_batch_size, accum = micro_batches(cfg.batch_size, cfg.micro_batch_size, d.world_size)

    # ---- model
    if cfg.init:
        model = load_model(cfg.init, kind="policy", device=d.device)
    else:
        enc = get_tokenizer(cfg.tokenizer)
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=enc.n_vocab, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0, tokenizer=cfg.tokenizer)).to(d.device)
    model.fused_lm_head = cfg.fused_lm_head
    enc = get_tokenizer(model.config.tokenizer)
    print0(f"model: {model.num_params() / 1e6:.2f}M parameters, tokenizer {model.config.tokenizer}, device {d.device}, {d.world_size} process(es)")

    # ---- data: (prompt_ids, response_ids) pairs
    stats = {}
    if cfg.data == "task":
        train = task.demonstrations("train", cfg.n_demos, seed=cfg.seed)
        val = task.demonstrations("val", 500, seed=cfg.seed + 1)
        stats["rows"] = len(train) + len(val)
    else:
        train = load_demonstrations(cfg.data, skip_bad_lines=cfg.skip_bad_lines, stats=stats)
        if cfg.val_data:
            val = load_demonstrations(cfg.val_data, skip_bad_lines=cfg.skip_bad_lines, stats=stats)
        else:
            n_val = max(1, len(train) // 20)
            train, val = train[:-n_val], train[-n_val:]
    block = model.config.block_size
    train, val = encode_examples(enc, train, block, stats), encode_examples(enc, val, block, stats)
    print0(f"data: {len(train)} train / {len(val)} val demonstrations; "
           f"{stats.get('truncated', 0)} prompts cut from the left, {stats.get('dropped', 0)} dropped (response longer than {block} tokens), "
           f"{stats.get('bad_lines', 0)} bad lines skipped")
    if not train or not val:
        raise DataError(f"{cfg.data}: no demonstrations left to {'train on' if not train else 'validate on'} "
                        f"after dropping those longer than the {block}-token context")

    def batch(examples):
        return demo_batch(examples, enc.eot_token, d.device)

    @torch.no_grad()
    def evaluate():
        # batches of at most a training micro-batch's tokens: validation never needs more memory
        model.eval()
        total, count = 0.0, 0
        for idx in token_batches([len(p) + len(r) for p, r in val], cfg.micro_batch_size * block):
            ids, _, loss_mask = batch([val[i] for i in idx])
            total += nll_sum(model, ids, loss_mask).item()
            count += loss_mask[:, 1:].sum().item()
        model.train()
        return total / count

    # ---- train
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, d.device)
    ddp_model = DDP(model) if d.ddp else model
    gen = torch.Generator().manual_seed(cfg.seed)  # the same on every process: they agree on the batch
    order, cursor, start = torch.randperm(len(train), generator=gen), 0, 0
    ckpt = resume_checkpoint(cfg, "policy", "max_steps", d)
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

    model.train()
    t0, tokens = time.time(), 0
    bar = tqdm(range(start + 1, cfg.max_steps + 1), desc="sft", disable=None if d.master else True, dynamic_ncols=True,
               initial=start, total=cfg.max_steps)
    for step in bar:
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(train), generator=gen), 0
        global_idx = order[cursor:cursor + cfg.batch_size]
        cursor += cfg.batch_size
        mine = global_idx[d.rank * cfg.micro_batch_size * accum:(d.rank + 1) * cfg.micro_batch_size * accum]
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps)
        chunks = [batch([train[i] for i in mine[k * cfg.micro_batch_size:(k + 1) * cfg.micro_batch_size]])
                  for k in range(accum)]
        # the loss is the mean over every response token of the global batch, whatever the split
        # into processes and micro-batches (DDP averages gradients over processes, hence * world_size)
        n_tokens = all_reduce_mean(sum(int(lm[:, 1:].sum()) for _, _, lm in chunks), d) * d.world_size
        loss_sum = 0.0
        for k, (ids, mask, loss_mask) in enumerate(chunks):
            if d.ddp:  # synchronise gradients only on the last micro-batch
                ddp_model.require_backward_grad_sync = k == accum - 1
            loss = nll_sum(ddp_model, ids, loss_mask) * d.world_size / n_tokens
            loss.backward()
            loss_sum += loss.item()
            tokens += int(mask.sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = {"loss": all_reduce_mean(loss_sum, d), "grad_norm": grad_norm.item(), "lr": optimizer.param_groups[0]["lr"],
                   "tok/s": round(all_reduce_mean(tokens, d) * d.world_size / (time.time() - t0))}
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            metrics["val_loss"] = all_reduce_mean(evaluate(), d)
            logger.log(step, metrics, bar=bar)
        elif d.master:
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            logger.log(step, metrics, console=[])  # file only; the bar shows progress
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            save(step)

    val_loss = metrics["val_loss"] if start < cfg.max_steps else all_reduce_mean(evaluate(), d)
    save(cfg.max_steps, val_loss=val_loss)
    print0(done_line("sft", stats, f"val_loss {val_loss:.4f} (perplexity {math.exp(val_loss):.3f}) in {time.time() - t0:.0f}s",
                     f"{cfg.out}/ckpt.pt", d.device))
    cleanup(d)


if __name__ == "__main__":
    run_main(main)
