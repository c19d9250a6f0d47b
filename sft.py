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
from tqdm import tqdm

from common import Batches, Run, RunConfig, all_reduce_mean, apply_lora, check, check_out, check_positive, cleanup, done_line, \
    load_model, lr_at, make_optimizer, micro_batches, parse_config, print0, run_main, setup, token_batches
from data.tasks import from_spec, tokenizer_name
from data.formats import DataError, load_demonstrations
from data.tokenizer import encode_examples, get_tokenizer, use_chat_template
from model import GPT, GPTConfig
from rollout import sequence_logprobs


@dataclass
class Config(RunConfig):
    data: str = "task"  # demonstrations JSONL (.gz too), or "task" for the built-in task ("task:sort" and so on: a task of the suite)
    val_data: str = ""  # held-out demonstrations; default: the task's val split, or 5% of --data
    init: str = ""  # checkpoint to start from; empty: a new model of the size below
    out: str = "out/sft"  # output directory: ckpt.pt, metrics.jsonl
    tokenizer: str = ""  # for a new model: "task", "task:NAME", "gpt2", or a directory with a Hugging Face tokenizer.json (default: --data's task's own, else the built-in's, "task")
    arch: str = "gpt2"  # new model: gpt2 (learned positions, LayerNorm, GELU) or llama (RoPE, RMSNorm, SwiGLU, grouped-query attention)
    n_layer: int = 4  # new model: transformer blocks
    n_head: int = 4  # new model: attention heads
    n_kv_head: int = 0  # new llama model: key/value heads, grouped-query attention (0: n_head)
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

    def check(self):
        check_positive(self, "batch_size", "max_steps", "eval_every", "n_layer", "n_head", "n_embd", "block_size", "n_demos")
        check(self.n_embd % self.n_head == 0, f"--n_embd {self.n_embd} must be a multiple of --n_head {self.n_head}")
        check(self.arch in ("gpt2", "llama"), f"--arch {self.arch}: expected gpt2 or llama")
        check(self.n_kv_head == 0 or (self.arch == "llama" and self.n_head % self.n_kv_head == 0),
              f"--n_kv_head {self.n_kv_head}: a llama model's --n_head {self.n_head} must be a multiple of it")


def nll_sum(model, examples, eot, device):
    """Summed negative log-likelihood of the response tokens (and their EOS) of [(prompt_ids,
    response_ids)], and how many there are (the caller divides by the count)."""
    logprobs, lengths = sequence_logprobs(model, examples, eot, device)
    return -logprobs.sum(), int(lengths.sum())


def main():
    # ---- config and setup
    cfg = parse_config(Config)
    d = setup(cfg.device, cfg.seed)
    micro, accum = micro_batches(cfg.batch_size, cfg.micro_batch_size, d.world_size)
    check_out(cfg)

    # ---- model
    if cfg.init:
        model = load_model(cfg.init, kind="policy", device=d.device, flag="--init")
    else:
        task = from_spec(cfg.data)
        tokenizer = cfg.tokenizer or (tokenizer_name(task) if task else "task")
        enc = get_tokenizer(tokenizer)
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=enc.n_vocab, n_layer=cfg.n_layer, n_head=cfg.n_head,
                              n_embd=cfg.n_embd, dropout=0.0, tokenizer=tokenizer, arch=cfg.arch,
                              n_kv_head=cfg.n_kv_head or None)).to(d.device)
    apply_lora(cfg, model)
    model.fused_lm_head = cfg.fused_lm_head
    enc = get_tokenizer(model.config.tokenizer)
    use_chat_template(enc, cfg.chat_template)
    print0(f"model: {model.config.arch}, {model.num_params() / 1e6:.2f}M parameters"
           f"{f' ({sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.3f}M in LoRA adapters)' if cfg.lora_rank else ''}, "
           f"tokenizer {model.config.tokenizer}, device {d.device}, {d.world_size} process(es)")

    # ---- data: (prompt_ids, response_ids) pairs
    train, val, stats = load_data(cfg, enc, model.config.block_size)

    # ---- train
    gen = torch.Generator().manual_seed(cfg.seed)  # the same on every process: they agree on the batch
    run = Run(cfg, d, model, make_optimizer(model, cfg.lr, cfg.weight_decay, d.device),
              Batches(len(train), cfg.batch_size, gen, d), kind="policy", step_field="max_steps", generators=[gen])
    start = run.resume()
    optimizer, logger = run.optimizer, run.logger
    model.train()
    t0, tokens = time.time(), 0
    bar = tqdm(range(start + 1, cfg.max_steps + 1), desc="sft", disable=None if d.master else True, dynamic_ncols=True,
               initial=start, total=cfg.max_steps)
    for step in bar:
        mine = run.batches.next()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps)
        chunks = [[train[i] for i in mine[k * micro:(k + 1) * micro]] for k in range(accum)]
        # the loss is the mean over every response token of the global batch, whatever the split
        # into processes and micro-batches (DDP averages gradients over processes, hence * world_size)
        n_tokens = all_reduce_mean(sum(len(r) for chunk in chunks for _, r in chunk), d) * d.world_size
        loss_sum = 0.0
        for k, chunk in enumerate(chunks):
            if d.ddp:  # synchronise gradients only on the last micro-batch
                run.ddp_model.require_backward_grad_sync = k == accum - 1
            nll, _ = nll_sum(run.ddp_model, chunk, enc.eot_token, d.device)
            loss = nll * d.world_size / n_tokens
            loss.backward()
            loss_sum += loss.item()
            tokens += sum(len(p) + len(r) for p, r in chunk)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = {"loss": all_reduce_mean(loss_sum, d), "grad_norm": grad_norm.item(), "lr": optimizer.param_groups[0]["lr"],
                   "tok/s": round(all_reduce_mean(tokens, d) * d.world_size / (time.time() - t0))}
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            metrics["val_loss"] = all_reduce_mean(evaluate(model, val, enc.eot_token, micro * model.config.block_size), d)
            logger.log(step, metrics, bar=bar)
        elif d.master:
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            logger.log(step, metrics, console=[])  # file only; the bar shows progress
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            run.save(step)

    # ---- save
    val_loss = metrics["val_loss"] if start < cfg.max_steps else \
        all_reduce_mean(evaluate(model, val, enc.eot_token, micro * model.config.block_size), d)
    run.save(cfg.max_steps, val_loss=val_loss)
    print0(done_line("sft", stats, f"val_loss {val_loss:.4f} (perplexity {math.exp(val_loss):.3f}) in {time.time() - t0:.0f}s",
                     f"{cfg.out}/ckpt.pt", d.device))
    cleanup(d)


def load_data(cfg, enc, block):
    """(train, val, stats): the demonstrations as (prompt_ids, response_ids), cut to the context."""
    stats = {}
    task = from_spec(cfg.data)
    if task:
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
    read = {"train": len(train), "val": len(val)}
    train, val = encode_examples(enc, train, block, stats), encode_examples(enc, val, block, stats)
    print0(f"data: {len(train)} train / {len(val)} val demonstrations; "
           f"{stats.get('truncated', 0)} prompts cut from the left, {stats.get('dropped', 0)} dropped (response longer than {block} tokens), "
           f"{stats.get('bad_lines', 0)} bad lines skipped")
    for split, kept in (("train", train), ("val", val)):
        if kept:
            continue
        source = cfg.val_data if split == "val" and cfg.val_data else cfg.data
        if read[split]:
            why = f"all {read[split]} are longer than the {block}-token context"
        elif split == "train" and not cfg.val_data and not task:
            why = (f"{read['val']} row(s) read, all held out for validation (1 in 20, at least 1); "
                   f"add rows or give held-out ones with --val_data")
        else:
            why = "the file has none"
        raise DataError(f"{source}: no demonstrations to {'train on' if split == 'train' else 'validate on'}: {why}")
    if len(train) < cfg.batch_size:
        raise DataError(f"{cfg.data}: {len(train)} demonstrations to train on, fewer than one batch of --batch_size "
                        f"{cfg.batch_size}; add demonstrations or lower --batch_size")
    return train, val, stats


@torch.no_grad()
def evaluate(model, val, eot, max_tokens):
    """Mean NLL per response token of the held-out demonstrations, in batches of at most
    max_tokens (a training micro-batch's: validation never needs more memory)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for idx in token_batches([len(p) + len(r) for p, r in val], max_tokens):
        nll, n = nll_sum(model, [val[i] for i in idx], eot, device)
        total, count = total + nll.item(), count + n
    model.train()
    return total / count


if __name__ == "__main__":
    run_main(main)
