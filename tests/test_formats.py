"""data/formats.py: what each loader reads from each accepted format, and each refusal's message."""

import gzip
import json

import pytest

from data.formats import (DataError, fit_to_context, load_candidates, load_demonstrations,
                          load_prompts, load_rankings, ranking_pairs, read_jsonl,
                          split_hh_pair, write_jsonl)

# Two assistant turns: the prompt must keep the first exchange and end at the second "Assistant:".
HH_CHOSEN = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant: Blue."
HH_REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant: No."
HH_PROMPT = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant:"


def write_lines(path, lines):
    """Write raw lines (dicts are dumped as JSON, strings written as they are)."""
    text = "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def refusal(loader, path, **kwargs):
    with pytest.raises(DataError) as info:
        loader(path, **kwargs)
    return str(info.value)


# -----------------------------------------------------------------------------
# Reading each format


def test_read_jsonl_line_numbers_skip_blank_lines(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [{"a": 1}, "", "   ", {"b": 2}])
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, {"b": 2})]


def test_read_jsonl_gzip_and_bom(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"prompt": "p1"}\n{"prompt": "p\\u00e9"}\n')
    assert load_prompts(path) == ["p1", "p\u00e9"]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "x"}\n')
    assert load_prompts(bom) == ["x"]


def test_demonstrations_all_three_formats(tmp_path):
    path = write_lines(tmp_path / "demos.jsonl", [
        {"prompt": "2+2=", "response": "4", "source": "extra fields are ignored"},
        {"prompt": "Say hi", "chosen": "hi", "rejected": "no"},
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
    ])
    assert load_demonstrations(path) == [
        {"prompt": "2+2=", "response": "4"},
        {"prompt": "Say hi", "response": "hi"},
        {"prompt": HH_PROMPT, "response": " Blue."},
    ]


def test_rankings_ties_and_k_from_2_to_5(tmp_path):
    path = write_lines(tmp_path / "rank.jsonl", [
        {"prompt": "p2", "responses": ["a", "b"], "ranking": [1, 0]},
        {"prompt": "p3", "responses": ["a", "b", "c"], "ranking": [[0, 2], 1], "rater": "ann"},
        {"prompt": "p4", "responses": ["a", "b", "c", "d"], "ranking": [2, [0, 3], 1]},
        {"prompt": "p5", "responses": list("abcde"), "ranking": [[4], [3], [2], [1], [0]]},
    ])
    rows = load_rankings(path)
    assert [r["ranking"] for r in rows] == [
        [[1], [0]], [[0, 2], [1]], [[2], [0, 3], [1]], [[4], [3], [2], [1], [0]]]
    assert [r["rater"] for r in rows] == [None, "ann", None, None]
    assert rows[3] == {"prompt": "p5", "responses": list("abcde"),
                       "ranking": [[4], [3], [2], [1], [0]], "rater": None}


def test_rankings_from_trl_and_hh(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [
        {"prompt": "Say hi", "chosen": "hi", "rejected": "no"},
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
    ])
    assert load_rankings(path) == [
        {"prompt": "Say hi", "responses": ["hi", "no"], "ranking": [[0], [1]], "rater": None},
        {"prompt": HH_PROMPT, "responses": [" Blue.", " No."], "ranking": [[0], [1]],
         "rater": None},
    ]


def test_prompts_from_every_format(tmp_path):
    path = write_lines(tmp_path / "prompts.jsonl", [
        {"prompt": "a"},
        {"prompt": "b", "response": "x"},
        {"prompt": "c", "responses": ["x", "y"], "ranking": [0, 1]},
        {"prompt": "d", "chosen": "x", "rejected": "y"},
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
    ])
    assert load_prompts(path) == ["a", "b", "c", "d", HH_PROMPT]


def test_candidates(tmp_path):
    path = write_lines(tmp_path / "cand.jsonl", [
        {"prompt": "p", "responses": ["only one"]},
        {"prompt": "q", "responses": ["x", "y", "z"], "seed": 3},
    ])
    assert load_candidates(path) == [{"prompt": "p", "responses": ["only one"]},
                                     {"prompt": "q", "responses": ["x", "y", "z"]}]


def test_write_jsonl_round_trip_and_append(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"prompt": "caf\u00e9", "responses": ["a"]}])
    write_jsonl(path, [{"prompt": "b", "responses": ["c"]}], append=True)
    write_jsonl(path, iter([{"prompt": "d", "responses": ["e"]}]), append=True)
    assert "caf\u00e9" in path.read_text(encoding="utf-8")  # readable, not \u escapes
    assert load_candidates(path) == [{"prompt": "caf\u00e9", "responses": ["a"]},
                                     {"prompt": "b", "responses": ["c"]},
                                     {"prompt": "d", "responses": ["e"]}]
    write_jsonl(path, [{"prompt": "new"}])  # without append the file is replaced
    assert load_prompts(path) == ["new"]
    gz = tmp_path / "out.jsonl.gz"
    write_jsonl(gz, [{"prompt": "z"}])
    assert load_prompts(gz) == ["z"]
    assert "cannot append to a gzip file" in refusal(
        lambda p: write_jsonl(p, [{"prompt": "y"}], append=True), gz)


def test_write_jsonl_append_puts_each_row_on_disk_before_the_next(tmp_path, monkeypatch):
    import data.formats
    synced = []
    monkeypatch.setattr(data.formats.os, "fsync", lambda fd: synced.append(fd))
    path = tmp_path / "labels.jsonl"

    def rows():  # a labelling session: each row must be on disk before the next one is made
        for k in range(3):
            lines = path.read_text().splitlines() if path.exists() else []
            assert len(lines) == k
            yield {"prompt": str(k)}

    write_jsonl(path, rows(), append=True)
    assert load_prompts(path) == ["0", "1", "2"]
    assert len(synced) == 3


# -----------------------------------------------------------------------------
# Refusals: one sentence with file, line and problem


def test_malformed_json_names_file_line_and_problem(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [{"prompt": "a", "response": "b"}] * 6
                       + ['{"prompt": "a" "response": "b"}'])
    assert refusal(load_demonstrations, path) == (
        f"{path}:7: not valid JSON (Expecting ',' delimiter)")


def test_non_object_line(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [{"prompt": "a"}, '["a", "b"]'])
    assert refusal(load_prompts, path) == f"{path}:2: expected a JSON object, got list"
    with pytest.raises(DataError, match=r"data.jsonl:2: expected a JSON object, got list"):
        list(read_jsonl(path))


def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    assert refusal(load_prompts, path) == f"{path}:2: not valid UTF-8"


def test_missing_field_names_the_closest_format(tmp_path):
    path = write_lines(tmp_path / "demos.jsonl", [{"prompt": "a", "response": "b"}] * 11
                       + [{"prompt": "a", "answer": "b"}])
    assert refusal(load_demonstrations, path) == (
        f"{path}:12: missing field 'response' (expected fields: prompt, response)")
    path = write_lines(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b"}])
    assert refusal(load_rankings, path) == (
        f"{path}:1: missing field 'rejected' (expected fields: prompt, chosen, rejected)")
    path = write_lines(tmp_path / "cand.jsonl", [{"prompt": "a", "response": "b"}])
    assert refusal(load_candidates, path) == (
        f"{path}:1: missing field 'responses' (expected fields: prompt, responses)")


def test_line_matching_no_format_lists_the_formats(tmp_path):
    path = write_lines(tmp_path / "demos.jsonl", [{"text": "a", "label": 1}])
    message = refusal(load_demonstrations, path)
    assert message.startswith(f"{path}:1: line matches no accepted format")
    for fields in ["{prompt, response}", "{prompt, chosen, rejected}", "{chosen, rejected}",
                   "got {text, label}"]:
        assert fields in message


@pytest.mark.parametrize("loader, row, problem", [
    (load_demonstrations, {"prompt": 3, "response": "b"},
     "field 'prompt' must be a string, got int"),
    (load_demonstrations, {"prompt": "a", "response": None},
     "field 'response' must be a string, got null"),
    (load_prompts, {"prompt": ["a"]},
     "field 'prompt' must be a string, got list"),
    (load_candidates, {"prompt": "a", "responses": "b"},
     "field 'responses' must be a list of strings, got string"),
    (load_candidates, {"prompt": "a", "responses": ["b", 7]},
     "field 'responses' item 1 must be a string, got int"),
    (load_candidates, {"prompt": "a", "responses": []},
     "field 'responses' is empty, expected at least 1 response"),
    (load_rankings, {"prompt": "a", "responses": ["b", "c"], "ranking": "0,1"},
     "field 'ranking' must be a list, got string"),
    (load_rankings, {"prompt": "a", "responses": ["b", "c"], "ranking": [0, 1], "rater": 5},
     "field 'rater' must be a string, got int"),
])
def test_wrong_types(tmp_path, loader, row, problem):
    path = write_lines(tmp_path / "bad.jsonl", [row])
    assert refusal(loader, path) == f"{path}:1: {problem}"


NOT_INDEX = "ranking must hold response indices or lists of them"


@pytest.mark.parametrize("responses, ranking, problem", [
    (["a", "b", "c", "d"], [0, 1, 2, 5], "ranking has index 5 but there are only 4 responses"),
    (["a", "b", "c"], [0, -1, 2], "ranking has negative index -1"),
    (["a", "b", "c"], [0, [1, 0], 2], "ranking has index 0 twice"),
    (["a", "b", "c", "d"], [3, 0], "ranking leaves out response 1, 2 (each of the 4 responses"),
    (["a", "b", "c"], [0, [], 1, 2], "ranking has an empty group []"),
    (["a", "b", "c"], [0, "1", 2], f'{NOT_INDEX}, got string "1"'),
    (["a", "b", "c"], [0, [1, [2]]], f"{NOT_INDEX}, got list [2]"),
    (["a", "b"], [True, 0], f"{NOT_INDEX}, got bool true"),
    (["a", "b"], [0, 1.0], f"{NOT_INDEX}, got float 1.0"),
    (["a"], [0], "field 'responses' must hold at least 2 responses to rank, got 1"),
])
def test_bad_rankings(tmp_path, responses, ranking, problem):
    good = {"prompt": "p", "responses": ["x", "y"], "ranking": [0, 1]}
    path = write_lines(tmp_path / "rank.jsonl",
                       [good, good, {"prompt": "p", "responses": responses, "ranking": ranking}])
    assert refusal(load_rankings, path).startswith(f"{path}:3: {problem}")


def test_bad_hh_lines(tmp_path):
    path = write_lines(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": "\n\nHuman: x"}])
    message = f"{path}:1: 'chosen' and 'rejected' share no '\\n\\nAssistant:' turn to split them at"
    for loader in (load_rankings, load_demonstrations, load_prompts):
        assert refusal(loader, path) == message


def test_hh_rows_that_part_early_or_quote_turns(tmp_path):
    # Shaped like the published rows that stopped reward.py: dialogues that part at an earlier
    # turn, and a response that holds literal "Human:" / "Assistant:" text, so the two dialogues
    # have different numbers of "\n\nAssistant:" markers.
    first = "\n\nHuman: Hi there\n\nAssistant:"
    fruit = HH_REJECTED.replace("Name a color", "Name a fruit")
    quoting = HH_PROMPT + " Here is a script:\n\nHuman: hello\n\nAssistant: hi\n\nHuman: bye"
    path = write_lines(tmp_path / "hh.jsonl", [
        {"chosen": HH_CHOSEN, "rejected": fruit},
        {"chosen": quoting, "rejected": HH_REJECTED},
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
    ])
    assert load_rankings(path) == [
        {"prompt": first, "responses": [HH_CHOSEN[len(first):], fruit[len(first):]], "ranking": [[0], [1]], "rater": None},
        {"prompt": HH_PROMPT, "responses": [quoting[len(HH_PROMPT):], " No."], "ranking": [[0], [1]], "rater": None},
        {"prompt": HH_PROMPT, "responses": [" Blue.", " No."], "ranking": [[0], [1]], "rater": None},
    ]
    # every reader that takes HH rows splits them the same way
    assert load_prompts(path) == [first, HH_PROMPT, HH_PROMPT]
    assert load_demonstrations(path) == [{"prompt": first, "response": HH_CHOSEN[len(first):]},
                                         {"prompt": HH_PROMPT, "response": quoting[len(HH_PROMPT):]},
                                         {"prompt": HH_PROMPT, "response": " Blue."}]


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "x.jsonl"
    empty.write_text("\n  \n")
    for loader in [load_demonstrations, load_rankings, load_prompts, load_candidates,
                   lambda p, **kw: list(read_jsonl(p, **kw))]:
        assert refusal(loader, empty) == f"{empty}: empty file, expected JSON lines"
        assert refusal(loader, empty, skip_bad_lines=True) == (
            f"{empty}: empty file, expected JSON lines")
        missing = tmp_path / "nope.jsonl"
        assert refusal(loader, missing) == f"{missing}: no such file"
    assert refusal(load_prompts, tmp_path) == f"{tmp_path}: is a directory, expected a JSONL file"


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    path.write_text('{"prompt": "not compressed"}\n')
    assert refusal(load_prompts, path).startswith(f"{path}: cannot read (")
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"prompt": "a"}\n' * 100)[:-12])
    assert refusal(load_prompts, truncated).startswith(f"{truncated}: cannot read (")


# -----------------------------------------------------------------------------
# skip_bad_lines


def test_skip_bad_lines_counts_each_kind_of_problem(tmp_path):
    path = write_lines(tmp_path / "demos.jsonl", [
        {"prompt": "a", "response": "1"},
        "{not json",
        "42",
        {"prompt": "b"},
        {"prompt": 5, "response": "x"},
        {"chosen": "no assistant turn", "rejected": "x"},
        {"prompt": "c", "response": "3"},
    ])
    stats = {}
    rows = load_demonstrations(path, skip_bad_lines=True, stats=stats)
    assert rows == [{"prompt": "a", "response": "1"}, {"prompt": "c", "response": "3"}]
    assert stats["bad_lines"] == 5
    assert load_demonstrations(path, skip_bad_lines=True) == rows  # stats=None is allowed
    stats = {}
    assert len(list(read_jsonl(path, skip_bad_lines=True, stats=stats))) == 5
    assert stats["bad_lines"] == 2  # read_jsonl only checks JSON objects, not fields
    with pytest.raises(DataError, match=r"demos.jsonl:2: not valid JSON"):
        load_demonstrations(path)


def test_skip_bad_lines_sets_zero_and_still_refuses_a_file_of_only_bad_lines(tmp_path):
    good = write_lines(tmp_path / "good.jsonl", [{"prompt": "a"}])
    stats = {}
    load_prompts(good, skip_bad_lines=True, stats=stats)
    assert stats == {"bad_lines": 0, "rows": 1}  # rows read, for the stage's closing line
    bad = write_lines(tmp_path / "bad.jsonl", [{"response": "a"}, "oops", {"prompt": 1}])
    stats = {}
    message = refusal(load_demonstrations, bad, skip_bad_lines=True, stats=stats)
    assert message == (f"{bad}: no valid line, 3 bad ones skipped (the first, line 1: missing "
                       "field 'prompt' (expected fields: prompt, response))")
    assert stats["bad_lines"] == 3


# -----------------------------------------------------------------------------
# Helpers


def test_ranking_pairs():
    assert ranking_pairs([[0], [1, 2], [3]]) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert ranking_pairs([[2], [0, 3], [1]]) == [(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)]
    assert ranking_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]  # plain ints are groups of one
    assert ranking_pairs([[0, 1]]) == []  # all tied: nothing to learn from
    assert len(ranking_pairs([[i] for i in range(5)])) == 10  # K choose 2


def test_split_hh_pair():
    assert split_hh_pair(HH_CHOSEN, HH_REJECTED) == (HH_PROMPT, " Blue.", " No.")
    # responses that start alike: the shared words stay in the responses, the prompt ends at the marker
    assert split_hh_pair("\n\nHuman: x\n\nAssistant: I do", "\n\nHuman: x\n\nAssistant: I don't") == (
        "\n\nHuman: x\n\nAssistant:", " I do", " I don't")
    assert split_hh_pair("\n\nHuman: x\n\nAssistant:", "\n\nHuman: x\n\nAssistant:") == (
        "\n\nHuman: x\n\nAssistant:", "", "")
    with pytest.raises(ValueError, match="share no '.*Assistant:' turn"):
        split_hh_pair("\n\nHuman: only a question", "\n\nHuman: only a question")
    with pytest.raises(ValueError, match="share no"):  # the marker must lie wholly in the shared part
        split_hh_pair("\n\nHuman: x\n\nAssistant: a", "\n\nHuman: x\n\nAssist")


def test_fit_to_context():
    prompt, response = list(range(10)), [100, 101, 102]
    assert fit_to_context(prompt, response, 13) == (prompt, response)  # fits exactly: unchanged
    assert fit_to_context(prompt, response, 20) == (prompt, response)
    assert fit_to_context(prompt, response, 8) == ([5, 6, 7, 8, 9], response)  # end of prompt kept
    assert fit_to_context(prompt, response, 4) == ([9], response)  # one prompt token still fits
    assert fit_to_context(prompt, response, 3) is None  # response alone fills the context
    assert fit_to_context(prompt, response, 2) is None
