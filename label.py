"""
Collect human rankings: show a prompt and K responses, type the order you prefer, and each
answer goes to a rankings file at once (flushed and fsync'ed), so Ctrl-C, a crash or a closed
terminal loses nothing. Started again with the same --out and --rater, it carries on after the
prompts that rater already answered.

    python label.py --init out/sft/ckpt.pt --prompts task --n 50 --k 4 --out rankings.jsonl --rater ann
    python label.py --init out/sft/ckpt.pt --prompts prompts.jsonl --k 4 --out rankings.jsonl --rater ann
    python label.py --candidates candidates.jsonl --out rankings.jsonl --rater ann   # no model needed
    python label.py --stats rankings.jsonl                # counts, rater agreement, position bias
    python label.py --stats rankings.jsonl --json true    # the same as one JSON object

--init samples K responses per prompt from a policy checkpoint, a few prompts at a time, while
you read; --prompts is a prompts JSONL or "task" for the built-in task's prompts of --split.
--candidates ranks responses that already exist (`sample.py --out`, or any {prompt, responses}
file). Responses are numbered from 1 on screen; the file holds 0-based indices.

Answers (best first):
    2 1 4 3     response 2 is best, then 1, then 4, then 3
    2 1=4 3     responses 1 and 4 are tied; the file gets "ranking": [1, [0, 3], 2]
    skip        no answer for this prompt; nothing is written, so a later session asks it again
    q           stop (so does Ctrl-D or Ctrl-C); everything answered is already on disk
    ?           help
A bad answer (a number twice, one out of range, a word) is explained in one line and the same
question is asked again.

--stats: for prompts ranked by two or more raters (same prompt and same responses), agreement
is the fraction of response pairs, among those both raters ordered (not tied), on which they
agree; position bias is how often each position was in the first group (with K responses and
no bias, about 1/K each).
"""

import getpass
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations

from common import check, load_model, parse_config, pick_device, run_main
from data.formats import DataError, get_prompts, load_candidates, load_rankings, ranking_pairs, write_jsonl
from rollout import sample_responses


@dataclass
class Config:
    out: str = "rankings.jsonl"  # rankings JSONL; every answer is appended to it at once
    rater: str = ""  # your name, written with each answer; default: your login name
    init: str = ""  # policy checkpoint to sample responses from
    prompts: str = "task"  # with --init: prompts JSONL, or "task" for the built-in task ("task:sort", ...: a task of the suite)
    split: str = "train"  # built-in task: train / val / test prompts
    n: int = 0  # how many prompts (0: all)
    k: int = 4  # responses per prompt (with --init)
    candidates: str = ""  # rank the responses of this candidates JSONL instead of sampling
    stats: str = ""  # print statistics of this rankings file and exit
    json: bool = False  # with --stats: print one JSON object instead of a table
    max_new_tokens: int = 40  # longest sampled response in tokens
    temperature: float = 1.0  # sampling temperature
    batch: int = 4  # prompts sampled at a time (small, so you wait little)
    seed: int = 0  # same seed, same samples (on CPU)
    device: str = ""  # cuda / cpu; default: cuda if available

    def check(self):
        check(self.k >= 2, f"--k must be 2 or more: ranking needs at least two responses, not {self.k}")
        check(self.n >= 0 and self.batch >= 1, "--n must be 0 (all) or more and --batch 1 or more")


HELP = """\
Type the responses' numbers, best first, separated by spaces:
    2 1 4 3     2 is best, then 1, then 4, then 3
    2 1=4 3     1 and 4 are equally good (a tie)
Every response goes in exactly once. Other answers:
    skip        leave this prompt unanswered (nothing is written)
    q           stop; your answers are already saved (Ctrl-D and Ctrl-C stop too)
    ?           this help"""


# ----------------------------------------------------------------------------- answers

def parse_answer(text, k):
    """One typed ranking of k responses -> groups of 0-based indices, best first:
    "2 1=4 3" -> [[1], [0, 3], [2]]. Raises ValueError with a one-line reason for the person."""
    groups, seen = [], set()
    for word in text.replace(",", " ").split():
        group = []
        for part in word.split("="):
            if not part.isdigit():
                example = " ".join(map(str, range(k, 0, -1)))
                raise ValueError(f"'{part or '='}' is not a response number; type numbers 1-{k} "
                                 f"like '{example}' (? for help)")
            i = int(part)
            if not 1 <= i <= k:
                raise ValueError(f"there is no response {i}; the responses are numbered 1-{k}")
            if i in seen:
                raise ValueError(f"response {i} is in the ranking twice; each of 1-{k} goes in once")
            seen.add(i)
            group.append(i - 1)
        groups.append(group)
    missing = [str(i) for i in range(1, k + 1) if i not in seen]
    if missing:
        raise ValueError(f"response {', '.join(missing)} missing; rank all {k} "
                         f"(tied ones joined by '=', like 1=4)")
    return groups


def compact(groups):
    """[[1], [0, 3], [2]] -> [1, [0, 3], 2]: the rankings file's form, ties as sub-lists."""
    return [g[0] if len(g) == 1 else g for g in groups]


def ask(prompt, responses, header):
    """Show one prompt and its responses; return the ranking groups, "skip" or "quit"."""
    print(f"\n{'=' * 30} {header} {'=' * 30}\n{prompt}")
    for i, r in enumerate(responses, start=1):
        print(f"  [{i}] " + r.replace("\n", "\n      "))
    while True:
        try:
            answer = input(f"ranking, best first (e.g. {' '.join(map(str, range(1, len(responses) + 1)))}; "
                           f"skip, q, ?) > ").strip()
        except EOFError:  # Ctrl-D, or the end of piped input
            print()
            return "quit"
        if answer.lower() in ("q", "quit", "exit"):
            return "quit"
        if answer.lower() in ("s", "skip"):
            return "skip"
        if answer in ("?", "h", "help"):
            print(HELP)
            continue
        if not answer:
            continue
        try:
            return parse_answer(answer, len(responses))
        except ValueError as e:
            print(f"  {e}")


# ----------------------------------------------------------------------------- resume

def answered_prompts(path, rater):
    """Prompt texts this rater already ranked in the rankings file at `path` (none if new)."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return set()
    with open(path, "rb") as f:  # a crash mid-write can leave a line without its newline:
        f.seek(-1, os.SEEK_END)  # end it, so the next answer starts a line of its own
        cut = f.read(1) != b"\n"
    if cut:
        with open(path, "a") as f:
            f.write("\n")
    stats = {}
    rows = load_rankings(path, skip_bad_lines=True, stats=stats)
    if stats["bad_lines"]:
        print(f"note: {path}: {stats['bad_lines']} unreadable line(s) skipped")
    return {row["prompt"] for row in rows if row["rater"] == rater}


def responses_to_rank(cfg, todo):
    """(prompt, responses) for each prompt still to rank: from the candidates file, or sampled
    from the checkpoint cfg.batch prompts at a time, so the first question comes quickly."""
    if cfg.candidates:
        yield from todo
        return
    device = pick_device(cfg.device)
    model = load_model(cfg.init, kind="policy", device=device)
    for start in range(0, len(todo), cfg.batch):
        prompts = todo[start:start + cfg.batch]
        # each batch its own seed, so a resumed session does not repeat the first batch's draws
        outs = sample_responses(model, prompts, k=cfg.k, seed=cfg.seed + start, max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature)
        yield from zip(prompts, outs)


def label(cfg):
    if cfg.candidates:
        items = [(c["prompt"], c["responses"]) for c in load_candidates(cfg.candidates)]
        rankable = [it for it in items if len(set(it[1])) >= 2]  # one distinct response leaves nothing to rank
        if len(rankable) < len(items):
            print(f"{cfg.candidates}: {len(items) - len(rankable)} of {len(items)} prompts skipped: fewer than 2 "
                  f"distinct responses to rank")
        if not rankable:
            raise DataError(f"{cfg.candidates}: no prompt has 2 or more distinct responses to rank; sample with --k 2 or more")
        items = rankable
    else:
        if not cfg.init:
            raise DataError("label.py: give --init CKPT (to sample responses) or --candidates FILE")
        items = get_prompts(cfg.prompts, cfg.split)
    items = items[:cfg.n] if cfg.n else items
    done = answered_prompts(cfg.out, cfg.rater)
    prompt_of = (lambda it: it[0]) if cfg.candidates else (lambda it: it)
    todo = [it for it in items if prompt_of(it) not in done]
    print(f"{len(items) - len(todo)} of {len(items)} prompts already ranked by {cfg.rater} in {cfg.out}; "
          f"{len(todo)} to go. Type ? for help.")
    n_done, n_skipped = 0, 0
    try:
        for i, (prompt, responses) in enumerate(responses_to_rank(cfg, todo)):
            answer = ask(prompt, responses, f"prompt {len(items) - len(todo) + i + 1}/{len(items)}")
            if answer == "quit":
                break
            if answer == "skip":
                n_skipped += 1
                continue
            write_jsonl(cfg.out, [{"prompt": prompt, "responses": responses, "ranking": compact(answer),
                                   "rater": cfg.rater}], append=True)
            n_done += 1
    except KeyboardInterrupt:
        print()
    print(f"saved {n_done} ranking(s) to {cfg.out}, skipped {n_skipped}")


# ----------------------------------------------------------------------------- stats

def ranking_stats(rows):
    """Counts, pairwise rater agreement and position bias of rankings rows (see the docstring)."""
    # agreement: rows of the same prompt and responses, compared rater with rater
    by_item = defaultdict(list)
    for row in rows:
        by_item[(row["prompt"], tuple(row["responses"]))].append(row)
    agree, total = defaultdict(int), defaultdict(int)
    for same in by_item.values():
        for a, b in combinations(same, 2):
            if a["rater"] == b["rater"]:
                continue
            if (a["rater"] or "") > (b["rater"] or ""):
                a, b = b, a
            pair = f"{a['rater']}-{b['rater']}"
            ra, rb = _positions(a["ranking"]), _positions(b["ranking"])
            for x, y in combinations(range(len(ra)), 2):
                da, db = ra[x] - ra[y], rb[x] - rb[y]
                if da and db:  # both ordered x and y (neither tied them)
                    total[pair] += 1
                    agree[pair] += (da > 0) == (db > 0)
    # position bias: how often position i was (among) the first
    first, seen = defaultdict(int), defaultdict(int)
    for row in rows:
        for i in range(len(row["responses"])):
            seen[i] += 1
            first[i] += i in row["ranking"][0]
    return {
        "prompts": len({row["prompt"] for row in rows}),
        "rankings": len(rows),
        "pairs": sum(len(ranking_pairs(row["ranking"])) for row in rows),
        "raters": sorted({str(row["rater"]) for row in rows}),
        "multi_rated_prompts": sum(len({r["rater"] for r in same}) >= 2 for same in by_item.values()),
        "agreement": {p: {"agree": agree[p], "pairs": total[p], "fraction": agree[p] / total[p]}
                      for p in sorted(total)},
        "agreement_overall": sum(agree.values()) / sum(total.values()) if total else None,
        "first_by_position": {i: first[i] / seen[i] for i in sorted(seen)},
    }


def _positions(groups):
    """Ranking groups -> each response's group number (0 = best)."""
    pos = {}
    for g, group in enumerate(groups):
        for i in group:
            pos[i] = g
    return [pos[i] for i in range(len(pos))]


def print_stats(path, s):
    print(f"{path}: {s['prompts']} prompts, {s['rankings']} rankings, {s['pairs']} implied pairs, "
          f"raters {', '.join(s['raters'])}")
    if s["agreement"]:
        print(f"\nrater agreement over {s['multi_rated_prompts']} prompts ranked by 2+ raters:")
        print(f"  {'raters':<20} {'pairs':>6} {'agree':>6}")
        for pair, a in s["agreement"].items():
            print(f"  {pair:<20} {a['pairs']:>6} {a['fraction']:>6.1%}")
        print(f"  {'overall':<20} {sum(a['pairs'] for a in s['agreement'].values()):>6} "
              f"{s['agreement_overall']:>6.1%}")
    else:
        print("\nrater agreement: no prompt was ranked by two raters")
    print("\nposition bias (share of rankings with this response position first):")
    print("  " + "  ".join(f"[{i + 1}] {f:.1%}" for i, f in s["first_by_position"].items()))


def main():
    cfg = parse_config(Config)
    if cfg.stats:
        s = ranking_stats(load_rankings(cfg.stats))
        if cfg.json:
            print(json.dumps(s, indent=1))  # positions are 0-based here, as in the file
        else:
            print_stats(cfg.stats, s)
        return
    cfg.rater = cfg.rater or getpass.getuser()
    label(cfg)


if __name__ == "__main__":
    run_main(main)
