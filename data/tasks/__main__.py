"""The suite's simulated raters on the command line, for any task (as `python -m data.task rate`
for the built-in):

    python -m data.tasks rate --task sort --candidates out/candidates.jsonl --out out/rankings.jsonl
"""

import argparse

from data.formats import load_candidates, write_jsonl
from data.tasks import TASKS, get_task

parser = argparse.ArgumentParser(prog="python -m data.tasks", description="the task suite's simulated raters")
sub = parser.add_subparsers(dest="command", required=True)
r = sub.add_parser("rate", help="rank a candidates file by a task's simulated raters")
r.add_argument("--task", required=True, choices=list(TASKS), help="which task's raters")
r.add_argument("--candidates", required=True, help="candidates JSONL (prompt, responses)")
r.add_argument("--out", required=True, help="rankings JSONL to write")
r.add_argument("--seed", type=int, default=0, help="same seed, same rankings")
args = parser.parse_args()
task = get_task(args.task)
candidates = load_candidates(args.candidates)
bad = next((c["prompt"] for c in candidates if not task.is_task_prompt(c["prompt"])), None)
if bad is not None:
    parser.exit(1, f"{args.candidates}: the prompt {bad[:60]!r} is not one of the {args.task} task's\n")
rows = task.rate(candidates, seed=args.seed)
write_jsonl(args.out, rows)
print(f"wrote {len(rows)} rankings by the {args.task} task's simulated raters to {args.out}")
