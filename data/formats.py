"""Readers and writer for minRLHF's JSONL data files (one JSON object per line).

A reader stops at the first bad line with one sentence naming file, line and problem
("demos.jsonl:12: missing field 'response' (expected fields: prompt, response)"); with
skip_bad_lines=True it skips the line instead and counts it in stats["bad_lines"]. Files ending
in `.gz` go through gzip. Each loader recognises a line's format by its fields, per line, so the
files people already have (TRL's prompt/chosen/rejected, Anthropic HH-RLHF) work as they are:

demonstrations  {"prompt", "response"}. Also TRL pairs {"prompt", "chosen", "rejected"} (the
                chosen response is the demonstration) and HH lines (split_hh_pair: the chosen one).
rankings        {"prompt", "responses": [2+ strings], "ranking", "rater"?}: 0-based indices into
                responses, best first, tied responses sharing a sub-list: [2, [0, 3], 1] is read
                as the groups [[2], [0, 3], [1]]. TRL pairs and HH lines are a ranking of two.
prompts         any line with a string "prompt" (so every format here); HH lines give their
                prompt by split_hh_pair.
candidates      {"prompt", "responses": [1+ strings]}: written by sample.py, ranked by raters.
HH-RLHF         {"chosen", "rejected"}: whole dialogues "\n\nHuman: ...\n\nAssistant: ...", maybe
                several turns; the prompt is their longest common prefix that ends with
                "\n\nAssistant:", each response is what follows it (see split_hh_pair).
"""

import gzip
import hashlib
import json
import os

HH_ASSISTANT = "\n\nAssistant:"


class DataError(ValueError):
    """Bad input data; str(e) is one sentence that starts with 'path:line: ' (or 'path: ' for
    whole-file problems such as an empty or missing file)."""


# -----------------------------------------------------------------------------
# Reading lines


def read_jsonl(path, *, skip_bad_lines=False, stats=None):
    """Yield (1-based line number, dict) for each line of a JSONL file; blank lines are ignored."""
    yield from _read(path, None, skip_bad_lines, stats)


def _read(path, formats, skip_bad_lines, stats):
    # The one loop every reader goes through: parse each line, convert it by `formats` (see
    # _convert; None keeps the dict as it is), and raise or skip on the first problem.
    path = str(path)
    if stats is not None:
        stats.setdefault("bad_lines", 0)
    kept, bad, first_bad = 0, 0, None
    for lineno, raw in _raw_lines(path):
        try:
            row = _parse_line(raw, lineno)
            if formats is not None:
                row = _convert(row, formats)
        except ValueError as e:  # every problem with one line is a ValueError naming it
            if not skip_bad_lines:
                raise DataError(f"{path}:{lineno}: {e}") from None
            bad += 1
            first_bad = first_bad or f"line {lineno}: {e}"
            if stats is not None:
                stats["bad_lines"] += 1
            continue
        kept += 1
        yield lineno, row
    if stats is not None:
        stats["rows"] = stats.get("rows", 0) + kept
    if kept == 0 and bad:
        raise DataError(f"{path}: no valid line, {bad} bad ones skipped (the first, {first_bad})")
    if kept == 0:
        raise DataError(f"{path}: empty file, expected JSON lines")


def _raw_lines(path):
    # Bytes, not text, so that a line that is not UTF-8 is reported with its number.
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    yield lineno, raw
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a JSONL file") from None
    except (OSError, EOFError) as e:  # also a corrupt or truncated .gz
        raise DataError(f"{path}: cannot read ({e})") from None


def _parse_line(raw, lineno):
    try:
        # utf-8-sig drops the byte-order mark some Windows editors put at the start of a file
        text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {_kind(row)}")
    return row


def _kind(value):
    # JSON's names for what json.loads returns, so the message speaks of what is in the file
    names = {dict: "object", list: "list", str: "string", int: "int", float: "float",
             bool: "bool", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# -----------------------------------------------------------------------------
# Recognising formats
#
# A format is (fields, convert): `fields` maps each required field to "string", "list" or
# "list of strings"; `convert` turns a line that has them into what the loader returns, raising
# ValueError on anything else wrong with it. Fields a format does not name are ignored.


def _convert(row, formats):
    """Convert a line by the first format whose fields it has; else say what is missing."""
    for fields, convert in formats:
        if all(name in row for name in fields):
            for name, kind in fields.items():
                _check_type(name, row[name], kind)
            return convert(row)
    # No format fits: name what is missing from the closest one, or if none is close list them.
    fields, _ = max(formats, key=lambda fmt: sum(name in row for name in fmt[0]))
    if any(name in row for name in fields):
        missing = next(name for name in fields if name not in row)
        raise ValueError(f"missing field '{missing}' (expected fields: {', '.join(fields)})")
    expected = " or ".join("{" + ", ".join(f) + "}" for f, _ in formats)
    got = ", ".join(list(row)[:8])
    raise ValueError(f"line matches no accepted format: expected fields {expected}, got {{{got}}}")


def _check_type(name, value, kind):
    if not isinstance(value, str if kind == "string" else list):
        raise ValueError(f"field '{name}' must be a {kind}, got {_kind(value)}")
    if kind == "list of strings":
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ValueError(f"field '{name}' item {i} must be a string, got {_kind(item)}")


def _hh(row):
    return split_hh_pair(row["chosen"], row["rejected"])


def _rater(row):
    rater = row.get("rater")
    if rater is not None and not isinstance(rater, str):
        raise ValueError(f"field 'rater' must be a string, got {_kind(rater)}")
    return rater


def _load(path, formats, skip_bad_lines, stats):
    return [row for _, row in _read(path, formats, skip_bad_lines, stats)]


# -----------------------------------------------------------------------------
# Loaders


def load_demonstrations(path, *, skip_bad_lines=False, stats=None):
    """[{"prompt": str, "response": str}] from demonstrations, TRL pairs or HH lines."""
    def hh(row):
        prompt, chosen, _ = _hh(row)
        return {"prompt": prompt, "response": chosen}

    formats = [
        ({"prompt": "string", "response": "string"},
         lambda row: {"prompt": row["prompt"], "response": row["response"]}),
        ({"prompt": "string", "chosen": "string", "rejected": "string"},
         lambda row: {"prompt": row["prompt"], "response": row["chosen"]}),
        ({"chosen": "string", "rejected": "string"}, hh),
    ]
    return _load(path, formats, skip_bad_lines, stats)


def load_rankings(path, *, skip_bad_lines=False, stats=None):
    """[{"prompt", "responses", "ranking": [[int, ...], ...], "rater"}] from rankings, TRL pairs
    or HH lines; rankings are normalised to groups, best first."""
    def ranking(row):
        responses = row["responses"]
        if len(responses) < 2:
            raise ValueError(f"field 'responses' must hold at least 2 responses to rank, "
                             f"got {len(responses)}")
        return {"prompt": row["prompt"], "responses": responses,
                "ranking": _ranking_groups(row["ranking"], len(responses)), "rater": _rater(row)}

    def trl(row):
        return {"prompt": row["prompt"], "responses": [row["chosen"], row["rejected"]],
                "ranking": [[0], [1]], "rater": _rater(row)}

    def hh(row):
        prompt, chosen, rejected = _hh(row)
        return {"prompt": prompt, "responses": [chosen, rejected], "ranking": [[0], [1]],
                "rater": _rater(row)}

    formats = [
        ({"prompt": "string", "responses": "list of strings", "ranking": "list"}, ranking),
        ({"prompt": "string", "chosen": "string", "rejected": "string"}, trl),
        ({"chosen": "string", "rejected": "string"}, hh),
    ]
    return _load(path, formats, skip_bad_lines, stats)


def load_prompts(path, *, skip_bad_lines=False, stats=None):
    """[str] from any line with a string "prompt", or the prompt of an HH line's chosen dialogue."""
    formats = [
        ({"prompt": "string"}, lambda row: row["prompt"]),
        ({"chosen": "string", "rejected": "string"}, lambda row: _hh(row)[0]),
    ]
    return _load(path, formats, skip_bad_lines, stats)


def get_prompts(source, split="test", n=0, offset=0):
    """The prompts to sample: a task's split ("task", "task:sort"), or a file's; n of them (0: all) after the first offset."""
    from data.tasks import from_spec
    task = from_spec(source)
    prompts = task.prompts(split) if task else load_prompts(source)
    return prompts[offset:offset + n] if n else prompts[offset:]


def load_candidates(path, *, skip_bad_lines=False, stats=None):
    """[{"prompt": str, "responses": [str, ...]}], at least one response each."""
    def candidates(row):
        if not row["responses"]:
            raise ValueError("field 'responses' is empty, expected at least 1 response")
        return {"prompt": row["prompt"], "responses": row["responses"]}

    formats = [({"prompt": "string", "responses": "list of strings"}, candidates)]
    return _load(path, formats, skip_bad_lines, stats)


# -----------------------------------------------------------------------------
# Rankings, dialogues, truncation


def _ranking_groups(ranking, n):
    """[2, [0, 3], 1] -> [[2], [0, 3], [1]], checked to rank each of n responses exactly once."""
    groups, seen = [], set()
    for item in ranking:
        group = item if isinstance(item, list) else [item]
        if not group:
            raise ValueError("ranking has an empty group []")
        for index in group:
            if isinstance(index, bool) or not isinstance(index, int):
                raise ValueError(f"ranking must hold response indices or lists of them, "
                                 f"got {_kind(index)} {json.dumps(index)}")
            if index < 0:
                raise ValueError(f"ranking has negative index {index}")
            if index >= n:
                raise ValueError(f"ranking has index {index} but there are only {n} responses")
            if index in seen:
                raise ValueError(f"ranking has index {index} twice")
            seen.add(index)
        groups.append(list(group))
    missing = [i for i in range(n) if i not in seen]
    if missing:
        raise ValueError(f"ranking leaves out response {', '.join(map(str, missing))} "
                         f"(each of the {n} responses must be ranked exactly once)")
    return groups


def ranking_pairs(ranking):
    """(better, worse) index pairs for every pair a ranking implies, as in InstructGPT's K-choose-2
    comparisons: [[0], [1, 2], [3]] -> (0, 1), (0, 2), (0, 3), (1, 3), (2, 3). Tied responses
    (same group) give no pair. Plain ints are taken as groups of one."""
    groups = [group if isinstance(group, list) else [group] for group in ranking]
    return [(better, worse)
            for i, higher in enumerate(groups) for lower in groups[i + 1:]
            for better in higher for worse in lower]


def split_hh_pair(chosen, rejected):
    """(prompt, chosen response, rejected response) of an HH-RLHF row. The prompt is the longest
    common prefix of the two dialogues that ends with "\\n\\nAssistant:"; each response is what
    follows it, even where that holds a later turn: some published rows have responses with literal
    "Human:" / "Assistant:" text, or dialogues that part before their last turn, so the last
    "\\n\\nAssistant:" of each would not give the same prompt. (TRL's HH-RLHF helpful-base
    preparation does the same.)"""
    shared = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(HH_ASSISTANT, 0, shared)  # the last marker wholly inside the shared part
    if cut < 0:
        raise ValueError("'chosen' and 'rejected' share no '\\n\\nAssistant:' turn to split them at")
    cut += len(HH_ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def fit_to_context(prompt_ids, response_ids, max_len):
    """The truncation policy: cut the prompt from the left (its end, next to the response, is what
    the response answers) so prompt + response fit in max_len; the response is never cut. Returns
    None when the response leaves no room for even one prompt token: the caller drops the example
    and counts it."""
    assert max_len > 0, max_len
    if len(response_ids) >= max_len:
        return None
    room = max_len - len(response_ids)
    if len(prompt_ids) > room:
        prompt_ids = prompt_ids[len(prompt_ids) - room:]
    return prompt_ids, response_ids


# -----------------------------------------------------------------------------
# Held-out splits


def prompt_hash(prompt):
    """A prompt's md5 as an integer: every split by prompt (the task's train/val/test, the
    rankings held out of reward.py and dpo.py, the prompts held out of ppo.py) hashes the text, so
    a prompt lands on the same side whatever the file's order, the seed or a repeat of it."""
    return int(hashlib.md5(prompt.encode()).hexdigest(), 16)


def held_out(prompt, frac):
    """True for about frac of all prompts, always the same ones."""
    return prompt_hash(prompt) % 1000 < frac * 1000


def split_rankings(rows, frac):
    """(train, held-out) rankings rows, split by prompt: a prompt's every ranking (two raters'
    too) lands on one side."""
    return [r for r in rows if not held_out(r["prompt"], frac)], [r for r in rows if held_out(r["prompt"], frac)]


def held_out_prompts(prompts, n):
    """(train, held-out) prompts: the n whose hash is lowest are held out; a prompt held out is
    never trained on, also where the list repeats it."""
    held = set(sorted(set(prompts), key=prompt_hash)[:n])
    return [p for p in prompts if p not in held], [p for p in prompts if p in held]


# -----------------------------------------------------------------------------
# Writing


def write_jsonl(path, rows, *, append=False):
    """Write rows as one JSON object per line (`.gz` through gzip). With append=True every row is
    flushed and fsync'ed as it is written, so a crash loses at most the row being written."""
    path = str(path)
    if path.endswith(".gz"):
        # a gzip stream cut by a crash cannot be read back, so appending needs a plain file
        if append:
            raise DataError(f"{path}: cannot append to a gzip file, use a plain .jsonl file")
        f = gzip.open(path, "wt", encoding="utf-8")
    else:
        f = open(path, "a" if append else "w", encoding="utf-8")
    with f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            if append:
                f.flush()
                os.fsync(f.fileno())
        f.flush()
