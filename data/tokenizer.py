"""
Tokenizers, all as `tiktoken.Encoding`, with `<|endoftext|>` as EOS:

- "task": the built-in task's own byte-level BPE, trained here on the task's text in well
  under a second, so the default run needs nothing from the internet and has a small vocabulary
  (a few hundred tokens: a small embedding, a fast softmax on a CPU). "task:NAME" is the same
  for a task of the suite in data/tasks (task:sort, task:follow, task:facts, task:refuse).
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
    if name == "task" or name.startswith("task:"):  # "task:sort": a task of data/tasks/, trained the same way
        from data import task
        from data.tasks import get_task
        t = task if name == "task" else get_task(name[len("task:"):])
        ranks = train_bpe(t.corpus(), n_merges=t.BPE_MERGES)
        return tiktoken.Encoding(name=name, pat_str=GPT2_PAT, mergeable_ranks=ranks,
                                 special_tokens={EOT: len(ranks)})
    if name == "gpt2":
        return gpt2_tokenizer()
    raise ValueError(f"unknown tokenizer {name!r} (known: task, task:NAME for a task of data/tasks, gpt2)")


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
