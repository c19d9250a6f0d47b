"""
Tokenizers, all with the interface of `tiktoken.Encoding` that the stages use (encode, decode,
eot_token, n_vocab, name):

- "task": the built-in task's own byte-level BPE, trained here on the task's text in well
  under a second, so the default run needs nothing from the internet and has a small vocabulary
  (a few hundred tokens: a small embedding, a fast softmax on a CPU). "task:NAME" is the same
  for a task of the suite in data/tasks (task:sort, task:follow, task:facts, task:refuse).
- "gpt2": GPT-2's BPE (50,257 tokens), for models imported from GPT-2 checkpoints; offline, from
  the local file that $MINRLHF_GPT2_BPE names (see gpt2_tokenizer).
- a directory holding a Hugging Face tokenizer.json (Llama, Qwen): read with the `tokenizers`
  library, behind the same interface (HFTokenizer), its EOS the directory's own; render_chat
  renders its chat template.
"""

import collections
import functools
import json
import os
import re

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
    if os.path.isdir(name):
        return HFTokenizer(name)
    raise ValueError(f"unknown tokenizer {name!r} (known: task, task:NAME for a task of data/tasks, gpt2, or a "
                     f"directory holding tokenizer.json)")


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


SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class HFTokenizer:
    """A Hugging Face tokenizer directory (tokenizer.json, as Llama 3 and Qwen ship theirs), read
    with the `tokenizers` library, behind the part of tiktoken.Encoding that the stages use.
    eot_token is the directory's EOS: eos_token in tokenizer_config.json, else eos_token_id in
    generation_config.json or config.json (the first, where it is a list); pad_token and bos_token
    the same way (pad falls back to EOS; bos is None when the model has none). Nothing is added
    to what encode returns (no BOS): a chat template writes its own."""

    def __init__(self, path):
        from tokenizers import Tokenizer

        from data.formats import DataError
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise DataError(f"{path}: no tokenizer.json, so not a Hugging Face tokenizer directory")
        self.name = path
        self.tokenizer = Tokenizer.from_file(file)
        self.special_tokens = {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}
        self.n_vocab = max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self.configs = [_read_json(path, f) for f in ("tokenizer_config.json", "generation_config.json", "config.json")]
        self.eot_token = self._token_id("eos")
        if self.eot_token is None:
            raise DataError(f"{path}: names no EOS token (eos_token in tokenizer_config.json, or eos_token_id "
                            f"in generation_config.json or config.json)")
        pad = self._token_id("pad")
        self.pad_token = self.eot_token if pad is None else pad
        self.bos_token = self._token_id("bos")

    def _token_id(self, kind):
        tokenizer_config, *others = self.configs
        token = tokenizer_config.get(kind + "_token")
        if isinstance(token, dict):  # an AddedToken written out: {"content": ..., ...}
            token = token.get("content")
        if token is not None:
            return self.tokenizer.token_to_id(token)
        for config in others:
            ids = config.get(kind + "_token_id")
            if ids is not None:
                return ids[0] if isinstance(ids, list) else ids
        return None

    def encode(self, text, *, allowed_special=(), disallowed_special="all"):
        """As tiktoken: the text of a special token ("<|im_end|>") is read as that token only where
        allowed_special="all"; disallowed_special=() reads it as plain text (user text is never an
        EOS), and the default refuses it."""
        allowed = allowed_special == "all"
        assert allowed or not allowed_special, "allowed_special takes 'all' or nothing"
        if not allowed:
            for token in self.special_tokens if disallowed_special == "all" else disallowed_special:
                if token in text:
                    raise ValueError(f"text holds the special token {token!r}: pass allowed_special='all' to "
                                     f"read it as one, or disallowed_special=() to read it as text")
        self.tokenizer.encode_special_tokens = not allowed
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def _read_json(path, file):
    file = os.path.join(path, file)
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def render_chat(tokenizer, messages, add_generation_prompt=True):
    """Text of a conversation in a model's chat format: the chat template of a tokenizer directory
    (or HFTokenizer) rendered with jinja2 as transformers' apply_chat_template(messages,
    tokenize=False, add_generation_prompt=...) renders it. messages: [{"role", "content"}].
    The template comes from chat_template.jinja, else tokenizer_config.json's chat_template (its
    "default" where there are several); the template sees bos_token, eos_token, ... as
    tokenizer_config.json names them. Encode the result with allowed_special="all"."""
    path = tokenizer.name if isinstance(tokenizer, HFTokenizer) else tokenizer
    template, specials = _chat_template(path)
    return _compile_chat_template(template).render(messages=messages, tools=None, documents=None,
                                                   add_generation_prompt=add_generation_prompt, **specials)


def _chat_template(path):
    """(template source, special token strings) of a tokenizer directory."""
    from data.formats import DataError
    config = _read_json(path, "tokenizer_config.json")
    specials = {}
    for name in SPECIAL_NAMES:
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None:
            specials[name] = token
    template = config.get("chat_template")
    if isinstance(template, list):  # several, by name: [{"name", "template"}]
        template = {t["name"]: t["template"] for t in template}.get("default")
    file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(file):  # as in transformers, the file wins over tokenizer_config.json
        with open(file, encoding="utf-8") as f:
            template = f.read()
    if not template:
        raise DataError(f"{path}: has no chat template (chat_template.jinja, or chat_template in tokenizer_config.json)")
    return template, specials


@functools.lru_cache(maxsize=None)
def _compile_chat_template(template):
    """The Jinja environment transformers renders chat templates in: sandboxed (templates come from
    the Hub), blocks trimmed, loop controls, its tojson (no HTML escaping), raise_exception and
    strftime_now. Its {% generation %} tag (assistant-token masks) is not provided."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def hh_messages(dialogue):
    """An HH-RLHF dialogue ("\\n\\nHuman: ...\\n\\nAssistant: ...", several turns maybe) as chat
    messages [{"role": "user" | "assistant", "content"}], each content stripped. A prompt ends
    with an empty "\\n\\nAssistant:" turn, which is left out: render_chat(..., add_generation_prompt=True)
    writes the assistant's header in its place."""
    parts = re.split(r"\n\n(Human|Assistant):", dialogue)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not an HH-RLHF dialogue: it does not start with '\\n\\nHuman:'")
    messages = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
                for who, text in zip(parts[1::2], parts[2::2])]
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def use_chat_template(enc, on):
    """--chat_template true: every prompt goes through the model's own chat template (encode_prompt),
    so that HH-RLHF dialogues reach an instruct model as it was trained to read them."""
    from data.formats import DataError
    if on and not (isinstance(enc, HFTokenizer) and _chat_template(enc.name)[0]):
        raise DataError(f"--chat_template true: the model's tokenizer {enc.name} has no chat template; it needs a "
                        f"Hugging Face directory whose tokenizer_config.json or chat_template.jinja holds one")
    enc.chat = on


def encode_prompt(enc, prompt):
    """A prompt's token ids: its text, or with use_chat_template on, the chat template's rendering of
    it (an HH dialogue turn by turn, any other text as one user turn), its special tokens as such."""
    if not getattr(enc, "chat", False):
        return enc.encode(prompt, disallowed_special=())
    messages = hh_messages(prompt) if prompt.startswith("\n\nHuman:") else [{"role": "user", "content": prompt.strip()}]
    return enc.encode(render_chat(enc, messages), allowed_special="all")


def encode_examples(enc, examples, max_len, stats=None):
    """[{prompt, response}] -> [(prompt_ids, response_ids)], the response ending in EOS.
    Too long: the prompt is cut from the left and the response kept; an example whose response
    alone does not fit is dropped. Counts go to stats["truncated"] and stats["dropped"]."""
    from data.formats import fit_to_context
    stats = {} if stats is None else stats
    out = []
    for ex in examples:
        p = encode_prompt(enc, ex["prompt"])
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
