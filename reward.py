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
Help Mitigate Overoptimization"; scoring.conservative_score). With --init A,B,C each member starts
from its own SFT trunk (SFT run with another seed: Eisenstein et al. 2023's "pretrain" ensembles).
The first trunk is PPO's policy, and normalisation samples from it.

Data: rankings JSONL {prompt, responses, ranking, rater?}; preference pairs {prompt, chosen,
rejected} and HH-RLHF {chosen, rejected} files work as they are.
"""

import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common import Batches, CheckpointError, Run, RunConfig, all_reduce_mean, apply_lora, check, check_out, \
    check_positive, cleanup, done_line, load_model, lr_at, make_optimizer, micro_batches, parse_config, print0, \
    run_main, setup
from data.tasks import from_spec, task_of
from data.formats import load_rankings, ranking_pairs, split_rankings
from data.tokenizer import encode_examples, get_tokenizer, ranking_data, use_chat_template
from losses import ranking_loss
from rollout import sample_responses, task_rankings
from scoring import gold_agreement, member_dir, score_sequences


@dataclass
class Config(RunConfig):
    data: str = "task"  # rankings / preference pairs JSONL (.gz too), or "task" ("task:sort", ...): SFT samples ranked by the task's simulated raters
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

    def check(self):
        check_positive(self, "batch_size", "epochs", "eval_every", "ensemble", "task_prompts", "normalize_prompts")
        trunks = self.init.split(",")
        check(len(trunks) == 1 or self.ensemble in (1, len(trunks)),
              f"--init names {len(trunks)} trunks but --ensemble is {self.ensemble}; give one member per trunk")


def main():
    # ---- config and setup
    cfg = parse_config(Config)
    d = setup(cfg.device, cfg.seed)
    micro, accum = micro_batches(cfg.batch_size, cfg.micro_batch_size, d.world_size)
    check_out(cfg)
    trunks = cfg.init.split(",")  # several: one member from each trunk, the first being PPO's policy
    cfg.ensemble = max(cfg.ensemble, len(trunks))

    # ---- model: the SFT trunk with a new scalar head (member 0's; each member draws its own head)
    torch.manual_seed(cfg.seed)
    first = apply_lora(cfg, load_model(trunks[0], kind=("policy", "reward"), head="scalar", device=d.device, flag="--init"))
    enc = get_tokenizer(first.config.tokenizer)
    use_chat_template(enc, cfg.chat_template)
    block = first.config.block_size

    # ---- data: rankings -> (sequences, pairs, row)
    stats = {}
    policy = None  # the SFT policy, loaded once for what samples from it: --data task and normalisation
    task = from_spec(cfg.data)
    if task:
        policy = load_model(trunks[0], kind="policy", device=d.device, flag="--init")
        rows = task_rankings(policy, task, cfg.task_prompts, cfg.seed)
        stats["rows"] = len(rows)
    else:
        rows = load_rankings(cfg.data, skip_bad_lines=cfg.skip_bad_lines, stats=stats)
    train, val, line = ranking_data(cfg, rows, enc, block, stats, stage="the reward model")
    print0(line)
    steps = cfg.epochs * (len(train) // cfg.batch_size)
    # scoring batches hold at most the tokens of a training micro-batch of pairs, so validation and
    # normalisation never need more memory than a training step
    max_tokens = micro * 2 * block

    # ---- the SFT samples that normalisation scores (drawn once, shared by every member)
    norm_seqs = None
    if cfg.normalize and d.master:  # only rank 0 saves, so only rank 0 needs the shift
        try:
            policy = policy or load_model(trunks[0], kind="policy", device=d.device, flag="--init")
        except CheckpointError:
            print0(f"normalize: skipped, {trunks[0]} is not an SFT (policy) checkpoint to sample from")
        else:
            train_rows = rows if cfg.val_data else split_rankings(rows, cfg.val_frac)[0]
            prompts = list(dict.fromkeys(row["prompt"] for row in train_rows))[:cfg.normalize_prompts]
            norm_seqs = sft_samples(policy, prompts, seed=cfg.seed)

    # ---- train each member, save
    t0 = time.time()
    results = []
    for k in range(cfg.ensemble):
        model = first if k == 0 else new_member(cfg, k, trunks, first.config.tokenizer, d.device)
        results.append(train_member(cfg, d, k, model, train, val, steps, (micro, accum), max_tokens, norm_seqs))
    result = results[0] if cfg.ensemble == 1 else " | ".join(f"member {k}: {r}" for k, r in enumerate(results))
    saved = f"{cfg.out}/ckpt.pt" + (f" and {cfg.ensemble - 1} more members in {cfg.out}/member*/" if cfg.ensemble > 1 else "")
    print0(done_line("reward", stats, result + f" in {time.time() - t0:.0f}s", saved, d.device))
    cleanup(d)


def new_member(cfg, k, trunks, tokenizer, device):
    """Ensemble member k's starting point: its SFT trunk with a new scalar head, drawn from its seed."""
    trunk = trunks[k] if len(trunks) > 1 else trunks[0]
    torch.manual_seed(cfg.seed + k)
    model = apply_lora(cfg, load_model(trunk, kind=("policy", "reward"), head="scalar", device=device, flag="--init"))
    if model.config.tokenizer != tokenizer:
        raise CheckpointError(f"{trunk}: uses tokenizer {model.config.tokenizer!r}, but {trunks[0]} uses {tokenizer!r}")
    return model


def train_member(cfg, d, k, model, train, val, steps, micro_accum, max_tokens, norm_seqs):
    """Train ensemble member k (member 0 is the whole run when --ensemble is 1) and save it in
    member_dir(cfg.out, k). Returns the closing summary of its validation."""
    micro, accum = micro_accum
    out = member_dir(cfg.out, k)
    gen = torch.Generator().manual_seed(cfg.seed + k)  # the same on every process: they agree on the batch
    if cfg.bootstrap:  # Efron's bootstrap: as many rankings, drawn with replacement
        train = [train[i] for i in torch.randint(len(train), (len(train),), generator=gen).tolist()]
    run = Run(cfg, d, model, make_optimizer(model, cfg.lr, cfg.weight_decay, d.device),
              Batches(len(train), cfg.batch_size, gen, d), kind="reward", step_field="epochs", generators=[gen], out=out)
    start = run.resume()
    if run.resumed and run.resumed.get("finished"):
        print0(f"reward model {k}: already trained ({out}/ckpt.pt)")
        return " | ".join(f"{n} {v:.4g}" for n, v in run.resumed["summary"].items())
    if cfg.ensemble > 1:
        print0(f"reward model {k + 1} of {cfg.ensemble} (seed {cfg.seed + k}{', bootstrap' if cfg.bootstrap else ''}) -> {out}")
    print0(f"reward model: {model.num_params() / 1e6:.2f}M parameters, device {d.device}, {d.world_size} process(es)")
    optimizer, logger = run.optimizer, run.logger
    eot = get_tokenizer(model.config.tokenizer).eot_token

    metrics = evaluate(model, val, eot, d.device, max_tokens)
    if start == 0:
        logger.log(0, metrics)
    bar = tqdm(range(start + 1, steps + 1), desc=f"reward{k if cfg.ensemble > 1 else ''}", disable=None if d.master else True,
               dynamic_ncols=True, initial=start, total=steps)
    for step in bar:
        mine = run.batches.next()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, steps)
        loss_sum, margins = 0.0, []
        for j in range(accum):
            chunk = [train[i] for i in mine[j * micro:(j + 1) * micro]]
            if d.ddp:
                run.ddp_model.require_backward_grad_sync = j == accum - 1
            rewards = score_sequences(run.ddp_model, [s for seqs, _, _ in chunk for s in seqs], eot, d.device)
            loss, m = ranking_loss(rewards, chunk)
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
            metrics.update(evaluate(model, val, eot, d.device, max_tokens))
            logger.log(step, metrics, bar=bar)
        else:
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            logger.log(step, metrics, console=[])
        if cfg.save_every and step % cfg.save_every == 0 and step < steps:
            run.save(step)

    summary = {n: v for n, v in metrics.items() if n.startswith("val/")}
    normalized = {}
    if norm_seqs is not None:
        before, after = normalize_with(model, norm_seqs, d.device, max_tokens)
        normalized = {"normalize/mean_before": before, "normalize/mean_after": after}
        logger.log(steps, normalized)
    run.save(steps, resume={"finished": True, "summary": summary}, ensemble=cfg.ensemble, member=k, **summary, **normalized)
    return " | ".join(f"{n} {v:.4g}" for n, v in summary.items())


# ----------------------------------------------------------------------------- held-out rankings

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
def evaluate(model, val, eot, device, max_tokens=None):
    """Accuracy and mean margin on held-out pairs; for the built-in task also the accuracy
    against the gold ordering (every pair of responses whose gold scores differ). Scores in
    batches of at most max_tokens."""
    model.eval()
    rewards = score_sequences(model, [s for seqs, _, _ in val for s in seqs], eot, device, max_tokens)
    margins = ranking_loss(rewards, val)[1]
    task = task_of([row["prompt"] for _, _, row in val])  # a task of the suite: its hidden gold orders the pairs too
    gold_right, gold_total = gold_agreement(rewards, val, task) if task else (0, 0)
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


# ----------------------------------------------------------------------------- normalisation

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


if __name__ == "__main__":
    run_main(main)
