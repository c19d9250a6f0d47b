"""Where does a reward-model ensemble disagree? On the built-in task, each member scores hand-made
responses (right, wrong sum, wrong name, no name), SFT samples and, optionally, a policy's samples;
printed per kind: gold, the members' mean score, their raw spread (std over members) and the
spread of score minus the member's score of an SFT sample to the same prompt (ppo.py --spread_vs_ref).

    python sample.py --init out/sft/ckpt.pt --split test --n 200 --k 2 --out out/probe_sft.jsonl
    python sample.py --init out/ppo_lowkl/ckpt.pt --split test --n 200 --k 1 --out out/probe_lowkl.jsonl
    python benchmarks/ensemble_spread.py out/reward5b/ckpt.pt out/probe_sft.jsonl out/probe_lowkl.jsonl
"""
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from data import task  # noqa: E402
from data.tokenizer import encode_examples, get_tokenizer  # noqa: E402
from scoring import load_ensemble, score_sequences  # noqa: E402

members = [m.eval() for m in load_ensemble(sys.argv[1])]
enc = get_tokenizer(members[0].config.tokenizer)
rows = [json.loads(l) for l in open(sys.argv[2])]
prompts = [r["prompt"] for r in rows]
rng = random.Random(0)
kinds = {"sft_ref": [r["responses"][0] for r in rows], "sft_other": [r["responses"][1] for r in rows]}
kinds.update({k: [] for k in ("right", "wrong_sum", "wrong_name", "hello")})
for p in prompts:
    name, a, b = task.parse_prompt(p)
    other = rng.choice([n for n in task.NAMES if n != name])
    c = a + b + rng.choice([-2, -1, 1, 2, 3]) if a + b > 2 else a + b + rng.choice([1, 2, 3])
    kinds["right"].append(f" hi {name}! {a} plus {b} is {a + b}. glad to help!")
    kinds["wrong_sum"].append(f" hi {name}! {a} plus {b} is {c}. glad to help!")
    kinds["wrong_name"].append(f" hi {other}! {a} plus {b} is {a + b}. glad to help!")
    kinds["hello"].append(f" hello! {a} plus {b} is {a + b}. glad to help!")
if len(sys.argv) > 3:
    pol = {row["prompt"]: row["responses"][0] for row in map(json.loads, open(sys.argv[3]))}
    kinds["policy"] = [pol[p] for p in prompts]
S = {}
with torch.no_grad():
    for kind, rs in kinds.items():
        seqs = [x + y for x, y in encode_examples(enc, [{"prompt": q, "response": r} for q, r in zip(prompts, rs)], 64)]
        S[kind] = torch.stack([score_sequences(m, seqs, enc.eot_token, "cpu") for m in members])
g = {k: sum(task.gold(prompts, rs)) / len(rs) for k, rs in kinds.items()}
print(f"{'kind':11s} {'gold':>6s} {'mean':>6s} {'raw sd':>7s} {'centred sd':>10s}   (K={len(members)}, {len(prompts)} prompts; centred: minus each member's score of the SFT reference sample)")
for kind, s in S.items():
    c = s - S["sft_ref"]
    print(f"{kind:11s} {g[kind]:6.2f} {s.mean():6.2f} {s.std(0, unbiased=False).mean():7.3f} {c.std(0, unbiased=False).mean():10.3f}")
for kind in ("wrong_sum", "wrong_name", "hello"):
    share = (S["right"] > S[kind]).float().mean(1)  # (K,): per member, prompts where the right answer scores higher
    print(f"right above {kind}, per member: " + " ".join(f"{x:.2f}" for x in share.tolist()))
