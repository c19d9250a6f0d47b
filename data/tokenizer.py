"""
Tokenizers, all as `tiktoken.Encoding`, with `<|endoftext|>` as EOS:

- "task": the built-in task's own byte-level BPE, trained here on the task's text in well
  under a second, so the default run needs nothing from the internet and has a small vocabulary
  (a few hundred tokens: a small embedding, a fast softmax on a CPU).
- "gpt2": GPT-2's BPE (50,257 tokens), for models imported from GPT-2 checkpoints; offline, from
  the local file that $MINRLHF_GPT2_BPE names (see gpt2_tokenizer).
"""

import collections
import functools
import os

import regex
import tiktoken
import tiktoken.load

# GPT-2's pre-tokenisation: words, numbers and punctuation split apart, each with its leading space
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"


def train_bpe(text, n_merges, pat_str=GPT2_PAT):
    """Byte-level BPE (Sennrich et al. 2016, byte-level as in GPT-2): start from the 256 bytes,
    repeatedly merge the most frequent adjacent pair inside the pre-tokenised pieces.
    Returns tiktoken's `mergeable_ranks` (bytes -> rank; a merge's rank is its order)."""
    ranks = {bytes([i]): i for i in range(256)}
    counts = collections.Counter(regex.findall(pat_str, text))
    words = {tuple(bytes([b]) for b in piece.encode()): n for piece, n in counts.items()}
    for _ in range(n_merges):
        pairs = collections.Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        # most frequent pair; ties broken by the bytes themselves so the result is deterministic
        (a, b), n = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if n < 2:
            break
        ranks[a + b] = len(ranks)
        words = {_merge(word, a, b): n for word, n in words.items()}
    return ranks


def _merge(word, a, b):
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


@functools.lru_cache(maxsize=None)
def get_tokenizer(name="task"):
    """The tokenizer a checkpoint records by name."""
    if name == "task":
        from data import task
        ranks = train_bpe(task.corpus(), n_merges=task.BPE_MERGES)
        return tiktoken.Encoding(name="task", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                                 special_tokens={EOT: len(ranks)})
    if name == "gpt2":
        return gpt2_tokenizer()
    raise ValueError(f"unknown tokenizer {name!r} (known: task, gpt2)")


GPT2_BPE_ENV = "MINRLHF_GPT2_BPE"  # path of a local r50k_base.tiktoken, for machines without internet
GPT2_BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # the hash tiktoken checks


def gpt2_tokenizer():
    """GPT-2's BPE through tiktoken: from the file that $MINRLHF_GPT2_BPE names when it is set,
    else tiktoken's own "gpt2" encoding (downloaded once, then cached by tiktoken)."""
    from data.formats import DataError
    path = os.environ.get(GPT2_BPE_ENV)
    if path:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file (named by {GPT2_BPE_ENV}, GPT-2's r50k_base.tiktoken)")
        try:
            ranks = tiktoken.load.load_tiktoken_bpe(path, expected_hash=GPT2_BPE_SHA256)
        except ValueError as e:
            raise DataError(f"{path}: not GPT-2's r50k_base.tiktoken ({e})") from None
        from tiktoken_ext.openai_public import r50k_pat_str  # GPT2_PAT above, in tiktoken's faster spelling
        return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={EOT: 50256}, explicit_n_vocab=50257)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no internet: requests' or urllib's errors, whichever tiktoken used
        raise DataError(f"GPT-2's tokenizer could not be downloaded ({type(e).__name__}); set {GPT2_BPE_ENV} "
                        f"to a local copy of r50k_base.tiktoken") from None


def encode_examples(enc, examples, max_len, stats=None):
    """[{prompt, response}] -> [(prompt_ids, response_ids)], the response ending in EOS.
    Too long: the prompt is cut from the left and the response kept; an example whose response
    alone does not fit is dropped. Counts go to stats["truncated"] and stats["dropped"]."""
    from data.formats import fit_to_context
    stats = {} if stats is None else stats
    out = []
    for ex in examples:
        p = enc.encode(ex["prompt"], disallowed_special=())
        r = enc.encode(ex["response"], disallowed_special=()) + [enc.eot_token]
        fitted = fit_to_context(p, r, max_len)
        if fitted is None:
            stats["dropped"] = stats.get("dropped", 0) + 1
            continue
        stats["truncated"] = stats.get("truncated", 0) + (len(fitted[0]) < len(p))
        out.append(fitted)
    return out


def pad(seqs, value, left=False):
    """List of id lists -> (B, T) LongTensor and its (B, T) attention mask (1 = token)."""
    import torch
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), value, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def encode_rankings(enc, rows, block_size, stats, split=False):
    """Rankings -> [(sequences, pairs, row)]: every response as prompt + response + EOS token ids
    (split=True: as the pair (prompt_ids, response_ids), for a loss on the response alone), and the
    (better, worse) index pairs its ranking implies. A ranking with a response that does not fit
    the context, or with no pair at all (all tied), is dropped and counted."""
    from data.formats import ranking_pairs
    out = []
    for row in rows:
        examples = [{"prompt": row["prompt"], "response": r} for r in row["responses"]]
        counts = {}
        seqs = encode_examples(enc, examples, block_size, counts)
        stats["truncated"] = stats.get("truncated", 0) + counts.get("truncated", 0)
        pairs = ranking_pairs(row["ranking"])
        if len(seqs) < len(examples) or not pairs:
            stats["dropped"] = stats.get("dropped", 0) + 1
            continue
        out.append((seqs if split else [p + r for p, r in seqs], pairs, row))
    return out


def ranking_data(cfg, rows, enc, block_size, stats, *, stage, split=False):
    """(train, val, summary line) for reward.py and dpo.py: rows split by prompt (or held-out rows
    from cfg.val_data), encoded as encode_rankings does. Too few to train and to hold out is one
    sentence that says what to do."""
    from data.formats import DataError, load_rankings, split_rankings
    if cfg.val_data:
        train_rows, val_rows = rows, load_rankings(cfg.val_data, skip_bad_lines=cfg.skip_bad_lines, stats=stats)
    else:  # split by prompt, so no held-out prompt was seen in training (also with two raters)
        train_rows, val_rows = split_rankings(rows, cfg.val_frac)
    train = encode_rankings(enc, train_rows, block_size, stats, split)
    val = encode_rankings(enc, val_rows, block_size, stats, split)
    line = (f"data: {len(train)} train rankings ({sum(len(p) for _, p, _ in train)} pairs) / {len(val)} val rankings; "
            f"{stats.get('truncated', 0)} responses' prompts cut from the left, {stats.get('dropped', 0)} rankings dropped "
            f"(a response longer than {block_size} tokens, or all tied), {stats.get('bad_lines', 0)} bad lines skipped")
    if not train or not val:
        raise DataError(f"{cfg.val_data if train and cfg.val_data else cfg.data}: {len(train)} rankings to train on and "
                        f"{len(val)} to hold out, but {stage} needs both: add rankings (with --val_frac {cfg.val_frac}, "
                        f"about 1 prompt in {round(1 / max(cfg.val_frac, 1e-9))} is held out), or give held-out rankings "
                        f"with --val_data")
    if len(train) < cfg.batch_size:
        raise DataError(f"{cfg.data}: {len(train)} training rankings, fewer than one batch of --batch_size {cfg.batch_size}; "
                        f"add rankings or lower --batch_size")
    return train, val, line
