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
    python reward.py --ensemble 3 --out out/reward3        # three members: out/reward3/ckpt.pt, member1/, member2/
    python reward.py --init out/sft/ckpt.pt,out/sft1/ckpt.pt,out/sft2/ckpt.pt --out out/reward3   # one per SFT trunk
    torchrun --nproc_per_node=2 reward.py

An ensemble (--ensemble K) is K reward models trained from the same SFT trunk, each with its own
seed for the head and the data order (and with --bootstrap its own resample of the rankings).
Member 0 is OUT/ckpt.pt, exactly what a single run writes; member k is OUT/member{k}/ckpt.pt, and
OUT/ckpt.pt records K, so one --reward path loads them all (load_ensemble). PPO then optimises the
conservative score mean - c * std over the members (Coste et al. 2023, "Reward Model Ensembles
Help Mitigate Overoptimization"), the std taken by default over each member's score minus its
score of the reference policy's response to the same prompt (conservative_score). With --init
A,B,C each member starts from its own SFT trunk (SFT run with another seed): Eisenstein et al. 2023
found that members sharing no trunk disagree more off the data than members that differ only in
their head and data order ("pretrain" against "finetune" ensembles); on the built-in task they
disagreed less than bootstrap members (benchmarks/overoptimisation_pretrain.txt). The first trunk
is PPO's policy, and normalisation samples from it.

Data: rankings JSONL {prompt, responses, ranking, rater?}; preference pairs {prompt, chosen,
rejected} and HH-RLHF {chosen, rejected} files work as they are.
"""

import hashlib
import itertools
import os
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import CheckpointError, ConfigError, Logger, all_reduce_mean, autocast, cleanup, done_line, load_checkpoint, load_model, lr_at, \
    make_optimizer, micro_batches, parse_config, print0, resume_checkpoint, rng_states, run_main, save_checkpoint, \
    set_rng_states, setup, token_batches
from data import task
from data.formats import DataError, load_rankings, ranking_pairs
from data.tokenizer import encode_examples, get_tokenizer, pad
from sample import sample_responses


@dataclass
class Config:
    data: str = "task"  # rankings / preference pairs JSONL (.gz too), or "task": SFT samples ranked by the simulated raters
    val_data: str = ""  # held-out rankings; default: the prompts of --data whose hash falls in val_frac
    task_prompts: int = 2000  # --data task: how many train prompts to sample and rank
    val_frac: float = 0.1  # share of prompts held out when there is no --val_data
    init: str = "out/sft/ckpt.pt"  # SFT checkpoint: the trunk the reward model starts from (A,B,C: an ensemble member from each)
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
    ensemble: int = 1  # train this many reward models from the same trunk, each with its own seed (head, data order); PPO scores with all
    bootstrap: bool = False  # with --ensemble: each member trains on its own bootstrap resample of the rankings
    save_every: int = 0  # steps between checkpoints that --resume can continue from (0: at the end only)
    resume: bool = False  # continue from the last checkpoint in --out (same settings; only --epochs may change)
    skip_bad_lines: bool = False  # skip malformed data lines (counted) instead of stopping
    seed: int = 0  # same seed, same numbers (on CPU)
    device: str = ""  # cuda / cpu / cuda:1; default: cuda if available


def encode_rankings(enc, rows, block_size, stats, split=False):
    """Rankings -> [(sequences, pairs, row)]: every response as prompt + response + EOS token ids
    (split=True: as the pair (prompt_ids, response_ids), for a loss on the response alone), and the
    (better, worse) index pairs its ranking implies. A ranking with a response that does not fit
    the context, or with no pair at all (all tied), is dropped and counted."""
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
        out.append((seqs if split else [p + r for p, r in seqs], pairs, row))
    return out


def last_token_scores(model, ids, mask, left_padded=True):
    """The scalar head on each sequence's last real token (the EOS of a finished response), for
    (B, T) ids and mask. A right-padded batch (left_padded=False) runs without the mask: causal
    attention alone keeps real tokens off the pads after them. Returns (B,) fp32."""
    with autocast(ids.device):
        values = model(ids, mask if left_padded else None).float()  # (B, T)
    last = mask.size(1) - 1 - mask.flip(1).argmax(1)  # column of the last 1 in each row
    return values[torch.arange(ids.size(0), device=ids.device), last]


def score_sequences(model, seqs, eot, device, max_tokens=None):
    """Reward of each token-id list, as last_token_scores, right-padded in batches of at most
    max_tokens (sequences x length; None: one batch). Returns (N,) fp32."""
    scores = []
    for idx in token_batches([len(s) for s in seqs], max_tokens or float("inf")):
        ids, mask = pad([seqs[i] for i in idx], eot)  # right-padded (n, T)
        scores.append(last_token_scores(model, ids.to(device), mask.to(device), left_padded=False))
    return torch.cat(scores)


def member_dir(out, k):
    """Where ensemble member k lives: member 0 is the directory itself."""
    return out if k == 0 else os.path.join(out, f"member{k}")


def load_ensemble(path, device="cpu", dtype=None):
    """Every reward model that one --reward path names: [model] for a single reward model (or a
    GPT-2 directory with a score head), the K members for an ensemble's ckpt.pt."""
    first = load_model(path, kind="reward", device=device)
    file = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    k = load_checkpoint(file, kind="reward").get("ensemble", 1) if os.path.isfile(file) else 1
    members = [first]
    for i in range(1, k):
        member = os.path.join(member_dir(os.path.dirname(file), i), "ckpt.pt")
        if not os.path.exists(member):
            raise CheckpointError(f"{file}: is an ensemble of {k} but member {i} ({member}) is missing; if reward.py "
                                  f"was stopped, run it again with --resume true")
        members.append(load_model(member, kind="reward", device=device))
    return [m.to(dtype) if dtype is not None else m for m in members]


def ensemble_scores(models, ids, mask):
    """(K, B) scores of K reward models on the same (B, T) left-padded batch: one forward per
    member; their trunks share nothing."""
    return torch.stack([last_token_scores(m, ids, mask) for m in models])


def conservative_score(scores, uncertainty_coef, baseline=None):
    """Mean over the members minus uncertainty_coef times their standard deviation (over the K
    members, dividing by K): the uncertainty-penalised reward of Coste et al. 2023. scores (K, B)
    -> (score, spread) each (B,); one member has spread 0 and scores as itself.
    baseline (K, B): each member's score of another response to the same prompt. The spread is
    then taken over score - baseline: a ranking loss fixes a reward model's scores only up to a
    constant per prompt, so members disagree on that constant too, and only the differences
    between responses to one prompt are something they learned."""
    spread = (scores if baseline is None else scores - baseline).std(0, unbiased=False)
    return scores.mean(0) - uncertainty_coef * spread, spread


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
def validate(model, val, eot, device, max_tokens=None):
    """Accuracy and mean margin on held-out pairs; for the built-in task also the accuracy
    against the gold ordering (every pair of responses whose gold scores differ). Scores in
    batches of at most max_tokens."""
    model.eval()
    rewards = score_sequences(model, [s for seqs, _, _ in val for s in seqs], eot, device, max_tokens)
    margins = ranking_loss(rewards, val)[1]
    gold_right, gold_total, start = 0, 0, 0
    for seqs, _, row in val:
        r, start = rewards[start:start + len(seqs)].tolist(), start + len(seqs)
        if not task.is_task_prompt(row["prompt"]):
            continue
        gold = [task.gold_score(row["prompt"], resp) for resp in row["responses"]]
        for a, b in itertools.combinations(range(len(gold)), 2):
            if gold[a] != gold[b]:
                gold_total += 1
                gold_right += (gold[a] > gold[b]) == (r[a] > r[b])
    model.train()
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


def task_rankings(policy, n, seed=0):
    """--data task: steps 2-3 of train.sh in one. 4 samples from the policy for each of the
    built-in task's first n train prompts, ranked by its simulated raters."""
    prompts = task.prompts("train")[:n]
    return task.rate([{"prompt": p, "responses": r} for p, r in zip(prompts, sample_responses(policy, prompts, k=4, seed=seed))],
                     seed=seed)


def sft_samples(policy, prompts, seed=0):
    """One sample per prompt from the SFT policy, as token ids of prompt + response + EOS: what
    normalisation sets to score 0 on average (PPO's defaults: 40 new tokens, temperature 1)."""
    enc = get_tokenizer(policy.config.tokenizer)
    responses = sample_responses(policy, prompts, k=1, seed=seed)
    examples = [{"prompt": p, "response": r[0]} for p, r in zip(prompts, responses)]
    return [p + r for p, r in encode_examples(enc, examples, policy.config.block_size)]


@torch.no_grad()
def normalize_with(model, seqs, device, max_tokens=None):
    """Subtract from the head's bias the mean score of seqs, so they score 0 on average.
    Returns that mean before and after."""
    eot = get_tokenizer(model.config.tokenizer).eot_token
    model.eval()
    before = score_sequences(model, seqs, eot, device, max_tokens).mean().item()
    model.score.bias -= before
    after = score_sequences(model, seqs, eot, device, max_tokens).mean().item()
    model.train()
    return before, after


def normalize_reward(model, policy, prompts, device, seed=0):
    """normalize_with the policy's samples, one per prompt."""
    return normalize_with(model, sft_samples(policy, prompts, seed), device)


def held_out(prompt, frac):
    return int(hashlib.md5(prompt.encode()).hexdigest(), 16) % 1000 < frac * 1000


def main():
    cfg = parse_config(Config)
    d = setup(cfg.device, cfg.seed)
    cfg.micro_batch_size, accum = micro_batches(cfg.batch_size, cfg.micro_batch_size, d.world_size)
    trunks = cfg.init.split(",")  # several: one member from each trunk, the first being PPO's policy
    if len(trunks) > 1:
        if cfg.ensemble not in (1, len(trunks)):
            raise ConfigError(f"--init names {len(trunks)} trunks but --ensemble is {cfg.ensemble}; give one member per trunk")
        cfg.ensemble = len(trunks)
    assert cfg.ensemble >= 1, "--ensemble must be at least 1"

    # ---- model: the SFT trunk with a new scalar head (member 0's; each member draws its own head)
    torch.manual_seed(cfg.seed)
    first = load_model(trunks[0], kind=("policy", "reward"), head="scalar", device=d.device)
    enc = get_tokenizer(first.config.tokenizer)
    eot, block = enc.eot_token, first.config.block_size

    # ---- data: rankings -> (sequences, pairs)
    stats = {}
    policy = None  # the SFT policy, loaded once for what samples from it: --data task and normalisation
    if cfg.data == "task":
        policy = load_model(trunks[0], kind="policy", device=d.device)
        rows = task_rankings(policy, cfg.task_prompts, cfg.seed)
        stats["rows"] = len(rows)
    else:
        rows = load_rankings(cfg.data, skip_bad_lines=cfg.skip_bad_lines, stats=stats)
    if cfg.val_data:
        train_rows, val_rows = rows, load_rankings(cfg.val_data, skip_bad_lines=cfg.skip_bad_lines, stats=stats)
    else:  # split by prompt, so no held-out prompt was seen in training (also with two raters)
        train_rows = [r for r in rows if not held_out(r["prompt"], cfg.val_frac)]
        val_rows = [r for r in rows if held_out(r["prompt"], cfg.val_frac)]
    train, val = encode_rankings(enc, train_rows, block, stats), encode_rankings(enc, val_rows, block, stats)
    n_pairs = sum(len(p) for _, p, _ in train)
    print0(f"data: {len(train)} train rankings ({n_pairs} pairs) / {len(val)} val rankings; "
           f"{stats.get('truncated', 0)} responses' prompts cut from the left, {stats.get('dropped', 0)} rankings dropped "
           f"(a response longer than {block} tokens, or all tied), {stats.get('bad_lines', 0)} bad lines skipped")
    if not train or not val:
        raise DataError(f"{cfg.val_data if train and cfg.val_data else cfg.data}: {len(train)} rankings to train on and "
                        f"{len(val)} to hold out, but the reward model needs both: add rankings (with --val_frac "
                        f"{cfg.val_frac}, about 1 prompt in {round(1 / max(cfg.val_frac, 1e-9))} is held out), "
                        f"or give held-out rankings with --val_data")
    steps = cfg.epochs * (len(train) // cfg.batch_size)
    if steps == 0:
        raise DataError(f"{cfg.data}: {len(train)} training rankings, fewer than one batch of --batch_size {cfg.batch_size}; "
                        f"add rankings or lower --batch_size")
    # scoring batches hold at most the tokens of a training micro-batch of pairs, so validation and
    # normalisation never need more memory than a training step
    max_tokens = cfg.micro_batch_size * 2 * block

    # ---- the SFT samples that normalisation scores (drawn once, shared by every member)
    norm_seqs = None
    if cfg.normalize and d.master:  # only rank 0 saves, so only rank 0 needs the shift
        try:
            policy = policy or load_model(trunks[0], kind="policy", device=d.device)
        except CheckpointError:
            print0(f"normalize: skipped, {trunks[0]} is not an SFT (policy) checkpoint to sample from")
        else:
            prompts = list(dict.fromkeys(r["prompt"] for r in train_rows))[:cfg.normalize_prompts]
            norm_seqs = sft_samples(policy, prompts, seed=cfg.seed)

    t0 = time.time()
    results = [train_member(cfg, d, k, first if k == 0 else None, first.config.tokenizer, train, val, steps, accum, max_tokens, norm_seqs)
               for k in range(cfg.ensemble)]
    result = results[0] if cfg.ensemble == 1 else " | ".join(f"member {k}: {r}" for k, r in enumerate(results))
    saved = f"{cfg.out}/ckpt.pt" + (f" and {cfg.ensemble - 1} more members in {cfg.out}/member*/" if cfg.ensemble > 1 else "")
    print0(done_line("reward", stats, result + f" in {time.time() - t0:.0f}s", saved, d.device))
    cleanup(d)


def train_member(cfg, d, k, model, tokenizer, train, val, steps, accum, max_tokens, norm_seqs):
    """Train ensemble member k (member 0 is the whole run when --ensemble is 1) and save it in
    member_dir(cfg.out, k); model: its starting point, or None to load it. Returns the closing
    summary of its validation."""
    out = member_dir(cfg.out, k)
    ckpt = resume_checkpoint(cfg, "reward", "epochs", d, path=os.path.join(out, "ckpt.pt"))
    if ckpt is not None and ckpt["resume"].get("finished"):
        print0(f"reward model {k}: already trained ({out}/ckpt.pt)")
        return " | ".join(f"{n} {v:.4g}" for n, v in ckpt.items() if n.startswith("val/"))
    trunks = cfg.init.split(",")
    trunk = trunks[k] if len(trunks) > 1 else trunks[0]
    if model is None:  # the SFT trunk with a new scalar head, its init drawn from this member's seed
        torch.manual_seed(cfg.seed + k)
        model = load_model(trunk, kind=("policy", "reward"), head="scalar", device=d.device)
        if model.config.tokenizer != tokenizer:
            raise CheckpointError(f"{trunk}: uses tokenizer {model.config.tokenizer!r}, but {trunks[0]} uses {tokenizer!r}")
    gen = torch.Generator().manual_seed(cfg.seed + k)  # the same on every process: they agree on the batch
    if cfg.bootstrap:  # Efron's bootstrap: as many rankings, drawn with replacement
        train = [train[i] for i in torch.randint(len(train), (len(train),), generator=gen).tolist()]
    if cfg.ensemble > 1:
        print0(f"reward model {k + 1} of {cfg.ensemble} (seed {cfg.seed + k}{', bootstrap' if cfg.bootstrap else ''}) -> {out}")
    print0(f"reward model: {model.num_params() / 1e6:.2f}M parameters from {trunk}, device {d.device}, {d.world_size} process(es)")
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, d.device)
    ddp_model = DDP(model) if d.ddp else model
    eot = get_tokenizer(model.config.tokenizer).eot_token
    order, cursor, start = torch.randperm(len(train), generator=gen), 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        order, cursor, start = ckpt["resume"]["order"], ckpt["resume"]["cursor"], ckpt["step"]
        set_rng_states(d, ckpt["resume"]["rng"], gen)
    logger = Logger(out, d.master, resume_step=start if ckpt else None)

    def save(step, finished=False, **extra):
        rng = rng_states(d, gen)  # every process takes part
        if d.master:
            save_checkpoint(f"{out}/ckpt.pt", model, kind="reward", config=cfg, step=step, optimizer=optimizer,
                            ensemble=cfg.ensemble, member=k,
                            resume={"order": order, "cursor": cursor, "rng": rng, "finished": finished}, **extra)

    if start == 0:
        metrics = validate(model, val, eot, d.device, max_tokens)
        logger.log(0, metrics)
    bar = tqdm(range(start + 1, steps + 1), desc=f"reward{k if cfg.ensemble > 1 else ''}", disable=None if d.master else True,
               dynamic_ncols=True, initial=start, total=steps)
    for step in bar:
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(train), generator=gen), 0
        global_idx = order[cursor:cursor + cfg.batch_size]
        cursor += cfg.batch_size
        mine = global_idx[d.rank * cfg.micro_batch_size * accum:(d.rank + 1) * cfg.micro_batch_size * accum].tolist()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, steps)
        loss_sum, margins = 0.0, []
        for j in range(accum):
            micro = [train[i] for i in mine[j * cfg.micro_batch_size:(j + 1) * cfg.micro_batch_size]]
            if d.ddp:
                ddp_model.require_backward_grad_sync = j == accum - 1
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
            metrics.update(validate(model, val, eot, d.device, max_tokens))
            logger.log(step, metrics, bar=bar)
        else:
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            logger.log(step, metrics, console=[])
        if cfg.save_every and step % cfg.save_every == 0 and step < steps:
            save(step)

    if start == steps:  # resumed at the very end: nothing left to train, validate what there is
        metrics = validate(model, val, eot, d.device, max_tokens)
    summary = {n: v for n, v in metrics.items() if n.startswith("val/")}
    normalized = {}
    if norm_seqs is not None:
        before, after = normalize_with(model, norm_seqs, d.device, max_tokens)
        normalized = {"normalize/mean_before": before, "normalize/mean_after": after}
        logger.log(steps, normalized)
    save(steps, finished=True, **summary, **normalized)
    return " | ".join(f"{n} {v:.4g}" for n, v in summary.items())


if __name__ == "__main__":
    run_main(main)
