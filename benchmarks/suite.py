"""
Every method on every task of the suite, over seeds: the measurement that picks the defaults.

    python benchmarks/suite.py                                   # 5 tasks x 3 seeds x 5 methods, defaults
    python benchmarks/suite.py --tasks sort,follow --seeds 0 --methods ppo,grpo \\
        --variant kl05="--kl_coef 0.5"                           # the same with extra flags, named kl05
    python benchmarks/suite.py --methods ppo --reward_variant e6="--epochs 6"   # reward models trained
                                                                 # with extra flags (reward_e6/), runs ppo-e6
    python benchmarks/suite.py --table benchmarks/suite.md       # only the table of what has run

Each task and seed gets train.sh's pipeline up to the reward model once, in OUT/TASK/sSEED/ (SFT,
2000 train prompts x 4 SFT samples ranked by the task's raters, the reward model), and each method
(with a variant's flags, if any) trains from there and is evaluated as train.sh evaluates it: eval.py
on 400 test prompts against SFT under the hidden gold -> OUT/TASK/sSEED/eval_RUN.json. A run whose
eval file exists is not run again. Jobs run --jobs at a time, one thread each; each command's output
goes to OUT/TASK/sSEED/logs/. The table: win rate against SFT, gold and KL to SFT per task and seed,
and the minimum and median win rate over them.
"""

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("add", "sort", "follow", "facts", "refuse")
METHODS = ("ppo", "grpo", "rloo", "reinforce_pp", "dpo")
N_PREF, K, N_EVAL = 2000, 4, 400  # as train.sh


def spec(task):
    return "task" if task == "add" else f"task:{task}"


def sh(log, *cmd):
    """Run one stage; its output goes to the log file, and a failure stops the suite with the log's path."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w") as f:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        if subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode:
            raise RuntimeError(f"{' '.join(cmd[:2]) if cmd[0] == '-m' else cmd[0]} failed: see {log}")


def base(d, task, seed, rm="reward", rm_flags=()):
    """SFT, the ranked SFT samples and the reward model for one task and seed (once, also when two
    suites run side by side: a file lock); and a reward model d/RM trained with extra flags on the
    same rankings, if asked."""
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/.base.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(f"{d}/reward/ckpt.pt"):
            build_base(d, task, seed)
        if not os.path.exists(f"{d}/{rm}/ckpt.pt"):
            sh(f"{d}/logs/{rm}.log", "reward.py", "--data", f"{d}/rankings.jsonl", "--init", f"{d}/sft/ckpt.pt",
               "--seed", str(seed), "--out", f"{d}/{rm}", "--overwrite", "true", *rm_flags)


def build_base(d, task, seed):
    s, sft = spec(task), f"{d}/sft/ckpt.pt"
    sh(f"{d}/logs/sft.log", "sft.py", "--data", s, "--out", f"{d}/sft", "--seed", str(seed), "--overwrite", "true")
    sh(f"{d}/logs/sample.log", "sample.py", "--init", sft, "--prompts", s, "--split", "train", "--n", str(N_PREF),
       "--k", str(K), "--seed", str(seed), "--out", f"{d}/candidates.jsonl")
    sh(f"{d}/logs/rate.log", "-m", "data.tasks", "rate", "--task", task, "--candidates", f"{d}/candidates.jsonl",
       "--seed", str(seed), "--out", f"{d}/rankings.jsonl")
    sh(f"{d}/logs/reward.log", "reward.py", "--data", f"{d}/rankings.jsonl", "--init", sft, "--seed", str(seed),
       "--out", f"{d}/reward", "--overwrite", "true")


def train(d, task, seed, method, run, extra, rm="reward"):
    """One method from SFT (against the reward model d/RM), then its eval against SFT."""
    sft, rm = f"{d}/sft/ckpt.pt", f"{d}/{rm}/ckpt.pt"
    common = ["--init", sft, "--ref", sft, "--seed", str(seed), "--out", f"{d}/{run}", "--overwrite", "true"]
    if method == "dpo":
        sh(f"{d}/logs/{run}.log", "dpo.py", "--data", f"{d}/rankings.jsonl", *common, *extra)
    else:
        sh(f"{d}/logs/{run}.log", "ppo.py", "--advantage", "gae" if method == "ppo" else method, "--data", spec(task),
           "--reward", rm, *common, *extra)
    sh(f"{d}/logs/eval_{run}.log", "eval.py", "--init", f"{d}/{run}/ckpt.pt", "--compare", sft, "--reward", rm,
       "--ref", sft, "--n", str(N_EVAL), "--prompts", spec(task), "--demos", spec(task), "--out", f"{d}/eval_{run}.json")


def result(path):
    ev = json.load(open(path))
    (_, m), (_, sft) = ev["models"].items()
    return {"win": ev["win_rate"], "gold": m["gold"], "sft_gold": sft["gold"], "kl": m["kl_exact"]}


def table(out, tasks, seeds):
    """A markdown table of every run found: a row per run, a column per task (the win rate of each
    seed, - where it has not run, and the mean gold in brackets), then the median KL reached, and the
    minimum and median win rate over every task-seed."""
    runs = sorted({f[5:-5] for t in tasks for s in seeds if os.path.isdir(f"{out}/{t}/s{s}")
                   for f in os.listdir(f"{out}/{t}/s{s}") if f.startswith("eval_") and f.endswith(".json")})
    lines = ["| run | " + " | ".join(tasks) + " | KL (median) | min win | median win | task-seeds |",
             "|---|" + "---|" * (len(tasks) + 4)]
    sft_gold = {}
    for run in runs:
        cells, wins, kls = [], [], []
        for t in tasks:
            found = {s: result(f"{out}/{t}/s{s}/eval_{run}.json") for s in seeds if os.path.exists(f"{out}/{t}/s{s}/eval_{run}.json")}
            rs = list(found.values())
            wins += [r["win"] for r in rs]
            kls += [r["kl"] for r in rs]
            sft_gold.setdefault(t, {}).update({s: r["sft_gold"] for s, r in found.items()})
            cells.append(" ".join(f"{found[s]['win']:.0%}" if s in found else "-" for s in seeds)
                         + (f" ({statistics.mean(r['gold'] for r in rs):.2f})" if rs else ""))
        if wins:
            lines.append(f"| {run} | " + " | ".join(cells) + f" | {statistics.median(kls):.2f} | {min(wins):.0%} | "
                         f"{statistics.median(wins):.0%} | {len(wins)} |")
    lines.append("| SFT gold | " + " | ".join(f"{statistics.mean(sft_gold[t].values()):.2f}" if sft_gold.get(t) else "-"
                                             for t in tasks) + " | | | | |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/suite", help="where every task and seed's runs go")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--variant", default="", help='NAME="FLAGS": the methods with these extra flags, as runs METHOD-NAME')
    p.add_argument("--reward_variant", default="", help='NAME="FLAGS": a reward model trained with these extra '
                   'flags (OUT/TASK/sSEED/reward_NAME), for runs named METHOD[-VARIANT]-NAME')
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="runs at a time, one thread each")
    p.add_argument("--table", default="", help="also write the table of every run found to this file")
    p.add_argument("--only_table", action="store_true", help="run nothing: the table of what has run")
    args = p.parse_args()
    tasks, seeds, methods = args.tasks.split(","), [int(s) for s in args.seeds.split(",")], args.methods.split(",")
    for t in tasks:
        if t not in TASKS:
            sys.exit(f"suite.py: --tasks may name {', '.join(TASKS)}, not '{t}'")
    for m in methods:
        if m not in METHODS:
            sys.exit(f"suite.py: --methods may name {', '.join(METHODS)}, not '{m}'")
    name, _, flags = args.variant.partition("=")
    extra, suffix = flags.split(), f"-{name}" if name else ""
    rm_name, _, rm_flags = args.reward_variant.partition("=")
    rm, suffix = (f"reward_{rm_name}", f"{suffix}-{rm_name}") if rm_name else ("reward", suffix)
    out = os.path.abspath(args.out)

    if not args.only_table:
        def job(t, s, m):
            d, run = f"{out}/{t}/s{s}", m + suffix
            if os.path.exists(f"{d}/eval_{run}.json"):
                return
            t0 = time.time()
            base(d, t, s, rm, rm_flags.split())
            train(d, t, s, m, run, extra, rm)
            r = result(f"{d}/eval_{run}.json")
            print(f"{t} s{s} {run}: win {r['win']:.1%}, gold {r['sft_gold']:.2f} -> {r['gold']:.2f}, KL {r['kl']:.2f} "
                  f"({time.time() - t0:.0f} s)", flush=True)

        # every task-seed's first run before any second one, so the bases are built side by side
        todo = [(t, s, m) for m in methods for s in seeds for t in tasks]
        with ThreadPoolExecutor(args.jobs) as pool:
            try:
                for f in [pool.submit(job, *j) for j in todo]:
                    f.result()
            except RuntimeError as e:  # a stage failed: say which and where its log is, not a traceback
                print(f"suite.py: {e}; the runs under way finish, no new one starts", file=sys.stderr, flush=True)
                pool.shutdown(cancel_futures=True)
                sys.exit(1)
    text = table(out, tasks, seeds)
    print(text)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
