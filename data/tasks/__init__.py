"""
The task suite: small tasks of different kinds, each with a prompt generator split by hash, a noisy
demonstrator, a hidden gold score and simulated raters, so that methods and defaults are chosen on
several tasks, not on one.

| name | module | kind |
| --- | --- | --- |
| add | data/task.py | the built-in: arithmetic, greeting by name, politeness, brevity |
| sort | data/tasks/sort.py | sort 3-6 words a to z or z to a: exact structure, credit by position |
| follow | data/tasks/follow.py | describe a topic under a word count / first / last / banned word |
| facts | data/tasks/facts.py | look up a fact in a tiny world; "i don't know" beats a wrong answer |
| refuse | data/tasks/refuse.py | refuse harmful requests, help with harmless ones that sound alike |

Every module has the built-in's interface: NAME, PROMPT_SUFFIX, BPE_MERGES, RATERS,
prompts(split), is_task_prompt, demonstrate, demonstrations(split, n, seed), judge, gold_score,
gold, rank, rate, corpus; the new ones also best_response(prompt), the response gold scores best.
A task's tokenizer is get_tokenizer("task:NAME") ("task" is the built-in's).

    python -m data.tasks rate --task sort --candidates out/candidates.jsonl --out out/rankings.jsonl
"""

from data import task as add
from data.tasks import facts, follow, refuse, sort

TASKS = {"add": add, "sort": sort, "follow": follow, "facts": facts, "refuse": refuse}


def get_task(name):
    """The task module called `name`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: the known tasks are {', '.join(TASKS)}")
    return TASKS[name]


def from_spec(spec):
    """The task that a --data or --prompts value names: "task" the built-in, "task:NAME" one of
    the suite; None for anything else (a file)."""
    if spec == "task":
        return add
    if not spec.startswith("task:"):
        return None
    if spec[len("task:"):] not in TASKS:
        from data.formats import DataError
        raise DataError(f"{spec}: no such task; the tasks are task (the built-in) and "
                        f"{', '.join('task:' + n for n in TASKS if n != 'add')}")
    return TASKS[spec[len("task:"):]]


def tokenizer_name(task):
    """The name a checkpoint records for a task's own tokenizer (data/tokenizer.get_tokenizer)."""
    return "task" if task is add else f"task:{task.NAME}"


def task_of(prompts):
    """The task whose prompts these all are, or None (also for no prompts at all)."""
    prompts = list(prompts)
    if not prompts:
        return None
    return next((t for t in TASKS.values() if all(t.is_task_prompt(p) for p in prompts)), None)
