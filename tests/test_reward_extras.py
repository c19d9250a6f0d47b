"""reward.py's normalisation (SFT samples score 0 on average, through main) and val accuracy split by
whether the raters agreed."""

import dataclasses
import sys

import pytest
import torch

import reward
from common import load_checkpoint, save_checkpoint
from data import task
from data.formats import write_jsonl
from model import GPT, GPTConfig
from data.tokenizer import encode_examples, encode_rankings, get_tokenizer
from scoring import score_sequences

CPU = torch.device("cpu")


def tiny(head="lm"):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=get_tokenizer("task").n_vocab, n_layer=1, n_head=2,
                         n_embd=16, head=head, tokenizer="task"))


def test_rater_agreement_labels():
    p, resp = "P", ["x", "y", "z"]
    rows = [{"prompt": p, "responses": resp, "ranking": [[0], [1], [2]], "rater": "ann"},
            {"prompt": p, "responses": resp, "ranking": [[1], [0, 2]], "rater": "ben"},
            {"prompt": "Q", "responses": ["u", "v"], "ranking": [[0], [1]], "rater": "ann"}]
    # ann's pairs (0,1) (0,2) (1,2): ben ordered 0 and 1 the other way, tied 0 and 2, agreed on 1 > 2
    assert reward.rater_agreement(rows) == [[False, None, True], [False, True], [None]]


def val_set(rows):
    enc = get_tokenizer("task")
    return encode_rankings(enc, rows, 64, {})


def test_evaluate_splits_accuracy_by_rater_agreement():
    model = tiny("scalar")
    prompts = task.prompts("val")[:2]
    resp = [" hi! 1 plus 1 is 2.", " 1 plus 1 is 3.", " ugh."]
    rows = [{"prompt": prompts[0], "responses": resp, "ranking": [[0], [1], [2]], "rater": "ann"},
            {"prompt": prompts[0], "responses": resp, "ranking": [[1], [0], [2]], "rater": "ben"},
            {"prompt": prompts[1], "responses": resp, "ranking": [[2], [1], [0]], "rater": "ann"}]
    metrics = reward.evaluate(model, val_set(rows), get_tokenizer("task").eot_token, CPU)
    enc = get_tokenizer("task")
    r = score_sequences(model, [p + q for p, q in encode_examples(
        enc, [{"prompt": prompts[0], "response": x} for x in resp], 64)], enc.eot_token, CPU).tolist()
    # agreed: 0 > 2 and 1 > 2, by both raters; split: 0 vs 1, once each way
    agree = [r[0] > r[2], r[1] > r[2]]
    assert metrics["val/accuracy_raters_agree"] == pytest.approx(sum(agree) / 2)
    assert metrics["val/accuracy_raters_disagree"] == pytest.approx(0.5)
    assert metrics["val/abs_margin_raters_disagree"] == pytest.approx(abs(r[0] - r[1]), abs=1e-5)
    # one rater per prompt: nothing to split by
    metrics = reward.evaluate(model, val_set(rows[2:]), enc.eot_token, CPU)
    assert not any("raters" in k for k in metrics)


def test_main_normalizes_and_saves_the_shift(tmp_path, monkeypatch):
    policy = tiny("lm")
    save_checkpoint(str(tmp_path / "sft.pt"), policy, kind="policy", config=policy.config, step=0)
    rows = [{"prompt": p, "responses": [" hi! 1 plus 1 is 2.", " ugh."], "ranking": [0, 1], "rater": "ann"}
            for p in task.prompts("train")[:10]]
    write_jsonl(tmp_path / "rankings.jsonl", rows)
    write_jsonl(tmp_path / "val.jsonl", rows[:2] + [dict(rows[0], rater="ben")])
    monkeypatch.setattr(sys, "argv", ["reward.py", "--data", str(tmp_path / "rankings.jsonl"), "--val_data",
                                      str(tmp_path / "val.jsonl"), "--init", str(tmp_path / "sft.pt"), "--out",
                                      str(tmp_path / "rm"), "--batch_size", "5", "--micro_batch_size", "5",
                                      "--epochs", "1", "--device", "cpu", "--normalize_prompts", "4"])
    reward.main()
    ckpt = load_checkpoint(str(tmp_path / "rm" / "ckpt.pt"), kind="reward")
    assert abs(ckpt["normalize/mean_after"]) < 1e-5 and ckpt["normalize/mean_before"] != 0
    assert ckpt["val/accuracy_raters_agree"] in (0.0, 1.0)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    assert dataclasses.asdict(model.config)["head"] == "scalar"
