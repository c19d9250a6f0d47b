"""
Look at what a model writes, or write candidates for raters to rank.

    python sample.py --init out/ppo/ckpt.pt                              # a few test prompts
    python sample.py --init out/sft/ckpt.pt --compare out/ppo/ckpt.pt    # two models side by side
    python sample.py --init out/sft/ckpt.pt --prompts prompts.jsonl --k 4 --out candidates.jsonl

--prompts is a prompts JSONL (any file with a "prompt" field, HH-RLHF too) or "task" for the
built-in task's prompts of --split. With --out, K responses per prompt are written as a
candidates file {prompt, responses}, which label.py (people) or `python -m data.task rate`
(the simulated raters) rank. On the built-in task the gold score is shown beside each response.
"""

from dataclasses import dataclass

import torch
from tqdm import tqdm

from common import compute_dtype, load_model, parse_config, pick_device, run_main
from data import task
from data.formats import DataError, load_prompts, write_jsonl
from data.tokenizer import get_tokenizer, pad
from model import Sampler


@dataclass
class Config:
    init: str = "out/ppo/ckpt.pt"  # checkpoint to sample from
    compare: str = ""  # a second checkpoint, shown side by side
    prompts: str = "task"  # prompts JSONL, or "task" for the built-in task
    split: str = "test"  # built-in task: train / val / test prompts
    n: int = 8  # how many prompts (0: all)
    offset: int = 0  # skip this many prompts first (round r of train.sh takes the prompts after those of rounds 1..r-1)
    k: int = 1  # responses per prompt
    out: str = ""  # write a candidates JSONL here instead of printing
    max_new_tokens: int = 40  # longest response in tokens
    temperature: float = 1.0  # sampling temperature (0: greedy)
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # nucleus sampling mass (1: all)
    batch_size: int = 256  # sequences per generation batch
    seed: int = 0  # same seed, same samples (on CPU)
    device: str = ""  # cuda / cpu; default: cuda if available


def encode_prompts(enc, prompts, max_len, stats=None):
    """Prompt token ids, cut from the left to max_len tokens (the end of a prompt matters most);
    how many were cut goes to stats["truncated"]."""
    ids = [enc.encode(p, disallowed_special=()) for p in prompts]
    if stats is not None:
        stats["truncated"] = stats.get("truncated", 0) + sum(len(x) > max_len for x in ids)
    return [x[-max_len:] for x in ids]


@torch.no_grad()
def generate(model, prompt_ids, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None, sampler=None):
    """Left-pad a batch of prompts and sample. Returns (prompt (B, P), prompt_mask (B, P),
    response (B, N)), the response filled with EOS after a row's first EOS. sampler: a
    model.Sampler to reuse (its static buffers and CUDA graphs); default a new one, with bf16
    weights on a GPU."""
    device = next(model.parameters()).device
    enc = get_tokenizer(model.config.tokenizer)
    ids, mask = pad(prompt_ids, enc.eot_token, left=True)
    ids, mask = ids.to(device), mask.to(device)
    sampler = sampler or Sampler(model, dtype=compute_dtype(device))
    response = sampler.generate(ids, mask, max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                                eos_id=enc.eot_token, n_vocab=enc.n_vocab, generator=generator)
    return ids, mask, response


def decode(enc, response):
    """One response's token ids -> text, up to (not including) its first EOS."""
    response = list(response)
    if enc.eot_token in response:
        response = response[:response.index(enc.eot_token)]
    return enc.decode(response)


def sample_responses(model, prompts, k=1, *, batch_size=256, seed=0, max_new_tokens=40, progress=False, **sampling):
    """K sampled responses for each prompt: [[str] * k] * len(prompts)."""
    model.eval()
    enc = get_tokenizer(model.config.tokenizer)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt_ids = encode_prompts(enc, prompts, model.config.block_size - max_new_tokens)
    flat = [i for i in range(len(prompts)) for _ in range(k)]  # each prompt k times, side by side
    sampler = Sampler(model, dtype=compute_dtype(device))
    texts = []
    for s in tqdm(range(0, len(flat), batch_size), desc="sampling", disable=None if progress else True):
        chunk = flat[s:s + batch_size]
        _, _, response = generate(model, [prompt_ids[i] for i in chunk], max_new_tokens=max_new_tokens,
                                  generator=generator, sampler=sampler, **sampling)
        texts += [decode(enc, r) for r in response.tolist()]
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]


def get_prompts(source, split="test", n=0, offset=0):
    """The prompts to sample: the built-in task's split, or a file's; n of them (0: all) after the first offset."""
    prompts = task.prompts(split) if source == "task" else load_prompts(source)
    return prompts[offset:offset + n] if n else prompts[offset:]


def main():
    cfg = parse_config(Config)
    device = pick_device(cfg.device)
    prompts = get_prompts(cfg.prompts, cfg.split, cfg.n, cfg.offset)
    if not prompts:
        raise DataError(f"{cfg.prompts}: no prompts left after skipping the first {cfg.offset}")
    sampling = dict(k=cfg.k, batch_size=cfg.batch_size, seed=cfg.seed, max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, progress=True)
    paths = [cfg.init] + ([cfg.compare] if cfg.compare else [])
    outputs = [sample_responses(load_model(p, kind="policy", device=device), prompts, **sampling) for p in paths]
    if cfg.out:
        write_jsonl(cfg.out, [{"prompt": p, "responses": r} for p, r in zip(prompts, outputs[0])])
        print(f"wrote {len(prompts)} prompts x {cfg.k} responses to {cfg.out}")
        return
    for i, prompt in enumerate(prompts):
        print("=" * 80 + "\n" + prompt)
        for path, out in zip(paths, outputs):
            for response in out[i]:
                gold = f"  [gold {task.gold_score(prompt, response):+.2f}]" if task.is_task_prompt(prompt) else ""
                print(f"--- {path}{gold}\n{response}")


if __name__ == "__main__":
    run_main(main)
