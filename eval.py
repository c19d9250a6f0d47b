"""
Score a policy checkpoint, or two side by side, on held-out prompts, and write JSON:

- gold: mean gold score of sampled responses (built-in task: the hidden judge), and how often
  each of its criteria holds (correct sum, greeting by the person's own name, polite, rude, ...)
- win_rate: how often --init's response beats --compare's under the gold judge, ties half
- judge, judge_win_rate: the same under a judge function (--judge FILE.py:fn, see rate.py), on
  any prompts; gold and its criteria only on the built-in task's prompts
- rm_score: mean reward-model score (--reward; an ensemble's mean over its members, as PPO scores it)
- kl_exact: mean KL(policy || reference) per response in nats, exact over the vocabulary (--ref)
- perplexity: on held-out demonstrations, the check that catches a policy that forgot how to write

    python eval.py --init out/ppo/ckpt.pt --compare out/sft/ckpt.pt --reward out/reward/ckpt.pt --ref out/sft/ckpt.pt
    python eval.py --init out/ppo/ckpt.pt --prompts prompts.jsonl --demos demos.jsonl --out eval.json
    python eval.py --init out/ppo/ckpt.pt --compare out/sft/ckpt.pt --judge judges/great_day.py:great_day

Both models answer the same prompts, each sampled at --temperature with a seed of its own.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common import check, check_tokenizers, compute_dtype, load_model, parse_config, pick_device, run_main, token_batches
from data.tasks import from_spec, task_of
from data.formats import DataError, get_prompts, load_demonstrations
from data.tokenizer import encode_examples, get_tokenizer, use_chat_template
from judges import judge_fn
from model import Sampler
from rollout import encode_prompts, exact_kl, generate, sequence_logprobs
from scoring import load_ensemble, member_scores, win_rate


@dataclass
class Config:
    init: str = "out/ppo/ckpt.pt"  # the policy to evaluate
    compare: str = ""  # a second policy: both are scored, and --init's win rate against it
    reward: str = ""  # reward model checkpoint, for rm_score
    ref: str = ""  # reference policy (usually SFT), for the KL
    judge: str = ""  # a judge FILE.py:fn(prompts, responses) -> [float]: its mean score, and the win rate under it
    prompts: str = "task"  # prompts JSONL, or "task" for the built-in task's test prompts ("task:sort", ...: a task of the suite)
    n: int = 400  # how many prompts (0: all)
    demos: str = "task"  # held-out demonstrations for perplexity ("task", "task:sort": that task's val split; "": skip)
    out: str = "out/eval.json"  # JSON results
    show: int = 5  # print this many prompts with the responses side by side (and keep them in the JSON)
    max_new_tokens: int = 40  # longest response in tokens
    temperature: float = 1.0  # sampling temperature (that of PPO's rollouts)
    batch_size: int = 200  # prompts per generation batch
    max_tokens: int = 16384  # tokens (sequences x length) per scoring forward: bounds its memory
    seed: int = 1234  # sampling seed (--compare uses seed + 1)
    chat_template: bool = False  # render prompts with the model's own chat template (a Hugging Face tokenizer directory's)
    device: str = ""  # cuda / cpu; default: cuda if available

    def check(self):
        check(self.n >= 0, f"--n must be 0 (every prompt) or more, not {self.n}")
        check(self.batch_size >= 1 and self.max_new_tokens >= 1 and self.max_tokens >= 1,
              "--batch_size, --max_new_tokens and --max_tokens must be 1 or more")


@torch.no_grad()
def rollouts(policy, prompts, cfg, seed, reward_models=(), ref_model=None):
    """Sample one response per prompt; per response its text, reward-model score (the mean over
    an ensemble's members) and exact KL to the reference."""
    enc = get_tokenizer(policy.config.tokenizer)
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt_ids = encode_prompts(enc, prompts, policy.config.block_size - cfg.max_new_tokens)
    sampler = Sampler(policy, dtype=compute_dtype(device))
    out = {"responses": [], "rm_score": [], "kl": [], "ended": []}
    for s in tqdm(range(0, len(prompts), cfg.batch_size), desc="eval", disable=None, leave=False):
        rollout = generate(sampler, prompt_ids[s:s + cfg.batch_size], max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, generator=generator)
        out["responses"] += rollout.texts
        out["ended"] += rollout.ended.tolist()
        if reward_models:
            out["rm_score"] += member_scores(reward_models, rollout.seq, rollout.seq_mask, cfg.batch_size).mean(0).tolist()
        if ref_model is not None:
            out["kl"] += exact_kl(policy, ref_model, rollout, cfg.temperature, cfg.batch_size).tolist()
    return out


@torch.no_grad()
def perplexity(model, demos, max_tokens):
    """exp(mean negative log-likelihood per response token) on demonstrations, in batches of at
    most max_tokens (sequences x length)."""
    enc = get_tokenizer(model.config.tokenizer)
    device = next(model.parameters()).device
    examples = encode_examples(enc, demos, model.config.block_size)
    logprob, count = 0.0, 0
    for idx in token_batches([len(p) + len(r) for p, r in examples], max_tokens):
        lp, lengths = sequence_logprobs(model, [examples[i] for i in idx], enc.eot_token, device)
        logprob, count = logprob + lp.sum().item(), count + lengths.sum().item()
    return math.exp(-logprob / count)


def mean(xs):
    return sum(xs) / len(xs) if xs else None


def main():
    cfg = parse_config(Config)
    device = pick_device(cfg.device)
    prompts = get_prompts(cfg.prompts, "test", cfg.n)
    if not prompts:
        raise DataError(f"{cfg.prompts}: no prompts")
    task = task_of(prompts)  # a task of the suite: its hidden gold judges the responses
    reward_models = load_ensemble(cfg.reward, device, flag="--reward") if cfg.reward else []
    ref_model = load_model(cfg.ref, kind="policy", device=device, flag="--ref").eval() if cfg.ref else None
    judge = judge_fn(cfg.judge) if cfg.judge else None
    demo_task = from_spec(cfg.demos)
    if demo_task:
        demos = demo_task.demonstrations("val", 500, seed=1)
    else:
        demos = load_demonstrations(cfg.demos) if cfg.demos else []

    results = {"prompts": len(prompts), "temperature": cfg.temperature, "models": {}}
    samples = {}
    for i, path in enumerate([cfg.init] + ([cfg.compare] if cfg.compare else [])):
        model = load_model(path, kind="policy", device=device, flag="--compare" if i else "--init").eval()
        use_chat_template(get_tokenizer(model.config.tokenizer), cfg.chat_template)
        check_tokenizers({path: model, **({cfg.reward: reward_models[0]} if reward_models else {}),
                          **({cfg.ref: ref_model} if ref_model is not None else {})})
        # independent samples for the two models: a shared seed would make similar policies write
        # the same responses, and the ties would pull the win rate towards 0.5
        r = rollouts(model, prompts, cfg, cfg.seed + i, reward_models, ref_model)
        samples[path] = r["responses"]
        m = {"rm_score": mean(r["rm_score"]), "kl_exact": mean(r["kl"]), "eos_rate": mean(r["ended"]),
             "resp_words": mean([len(t.split()) for t in r["responses"]])}
        if task is not None:
            r["gold"] = [task.gold_score(p, t) for p, t in zip(prompts, r["responses"])]
            m["gold"] = mean(r["gold"])
            judged = [task.judge(p, t) for p, t in zip(prompts, r["responses"])]
            # rates, and mean words; a criterion that does not apply to a prompt (None) counts in no mean
            m["criteria"] = {k: mean([float(j[k]) for j in judged if j[k] is not None]) for k in judged[0]}
            samples[path + ":gold"] = r["gold"]
        if judge is not None:
            r["judge"] = judge(prompts, r["responses"])
            m["judge"] = mean(r["judge"])
            samples[path + ":judge"] = r["judge"]
        if demos:
            m["perplexity"] = perplexity(model, demos, cfg.max_tokens)
        results["models"][path] = {k: v for k, v in m.items() if v is not None}
        print(f"{path}: " + " | ".join(f"{k} {v:.4g}" for k, v in results["models"][path].items() if k != "criteria"))
        if "criteria" in m:
            print("  gold criteria: " + " | ".join(f"{k} {v:.2f}" for k, v in m["criteria"].items() if v is not None))

    scorers = {"gold": "the gold judge"} if task is not None else {}  # the scores a response is judged by
    if judge is not None:
        scorers["judge"] = f"the judge {cfg.judge}"
    for key, name in scorers.items() if cfg.compare else ():
        rate_key = "win_rate" if key == "gold" else "judge_win_rate"
        results[rate_key] = win_rate(samples[f"{cfg.init}:{key}"], samples[f"{cfg.compare}:{key}"])
        print(f"win rate of {cfg.init} against {cfg.compare} under {name}: {results[rate_key]:.3f} "
              f"on {len(prompts)} prompts (ties count half)")
    results["examples"] = [{"prompt": prompts[i], "responses": [samples[p][i] for p in results["models"]],
                            **{key: [samples[f"{p}:{key}"][i] for p in results["models"]] for key in scorers}}
                           for i in range(min(cfg.show, len(prompts)))]
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    with open(cfg.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    run_main(main)
