"""
Scores of responses: a reward model's (its scalar head on the last token), an ensemble's, and
what PPO maximises (reward models and/or a judge function).

    last_token_scores, score_sequences    one reward model on a batch / on token-id lists
    load_ensemble                         every reward model one --reward path names (1, or an ensemble's K)
    member_scores, conservative_score     (K, B) scores, and mean - coef * spread (Coste et al. 2023)
    rollout_score                         the score PPO maximises, and its parts for logging
"""

import itertools
import os

import torch

from common import CheckpointError, autocast, load_checkpoint, load_model, token_batches
from data.tokenizer import pad


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


def win_rate(a, b):
    """How often score a beats score b, prompt by prompt; ties count half."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


def gold_agreement(scores, rankings, task):
    """(right, total): of every pair of responses in rankings ([(sequences, pairs, row)], as
    encode_rankings gives them) whose hidden gold scores differ, how many scores (one per response,
    in order) order as gold does."""
    right = total = start = 0
    for seqs, _, row in rankings:
        r, start = scores[start:start + len(seqs)].tolist(), start + len(seqs)
        gold = [task.gold_score(row["prompt"], resp) for resp in row["responses"]]
        for a, b in itertools.combinations(range(len(gold)), 2):
            if gold[a] != gold[b]:
                total += 1
                right += (gold[a] > gold[b]) == (r[a] > r[b])
    return right, total


# ----------------------------------------------------------------------------- ensembles

def member_dir(out, k):
    """Where ensemble member k lives: member 0 is the directory itself."""
    return out if k == 0 else os.path.join(out, f"member{k}")


def load_ensemble(path, device="cpu", dtype=None, flag="--reward"):
    """Every reward model that one --reward path names: [model] for a single reward model (or a
    Hugging Face directory with a score head), the K members for an ensemble's ckpt.pt. Frozen:
    eval mode, no gradients, in dtype when given."""
    first = load_model(path, kind="reward", device=device, flag=flag)
    file = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    k = load_checkpoint(file, kind="reward", flag=flag).get("ensemble", 1) if os.path.isfile(file) else 1
    members = [first]
    for i in range(1, k):
        member = os.path.join(member_dir(os.path.dirname(file), i), "ckpt.pt")
        if not os.path.exists(member):
            raise CheckpointError(f"{file}: is an ensemble of {k} but member {i} ({member}) is missing; if reward.py "
                                  f"was stopped, run it again with --resume true")
        members.append(load_model(member, kind="reward", device=device, flag=flag))
    return [(m.to(dtype) if dtype is not None else m).eval().requires_grad_(False) for m in members]


def member_scores(reward_models, seq, seq_mask, chunk):
    """(K, B) every reward model's score of each left-padded sequence, a chunk of rows at a time;
    one forward per member (their trunks share nothing)."""
    return torch.cat([torch.stack([last_token_scores(m, seq[s:s + chunk], seq_mask[s:s + chunk]) for m in reward_models])
                      for s in range(0, seq.size(0), chunk)], 1)


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


@torch.no_grad()
def rollout_score(rollout, prompts, reward_models, reward_fn, *, uncertainty_coef=0.0, reward_fn_weight=1.0,
                  chunk=64, baseline=None):
    """The score (B,) that PPO maximises, and its parts for logging: the reward models'
    conservative score (over an ensemble: mean - uncertainty_coef * spread, the spread taken
    against the members' baseline scores when given; one model: its score), plus
    reward_fn_weight times the judge's score."""
    score, parts = torch.zeros(len(rollout.texts), device=rollout.seq.device), {}
    if reward_models:
        scores = member_scores(reward_models, rollout.seq, rollout.seq_mask, chunk)  # (K, B)
        score, spread = conservative_score(scores, uncertainty_coef, baseline)
        parts["rm_score"] = scores.mean(0)
        if len(reward_models) > 1:
            parts["rm_spread"] = spread
    if reward_fn is not None:
        judged = torch.tensor(reward_fn(prompts, rollout.texts), device=score.device, dtype=torch.float32)
        score = score + reward_fn_weight * judged
        parts["reward_fn"] = judged
    return score, parts
