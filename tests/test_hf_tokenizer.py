"""Hugging Face tokenizer directories (tokenizer.json, as Llama and Qwen ship theirs): a tiny BPE
trained here with `tokenizers` round-trips text through get_tokenizer's HFTokenizer, EOS comes from
the directory's configs, special tokens' text is plain text unless allowed, chat templates render
exactly as transformers' apply_chat_template does, and a model directory carries its tokenizer
through GPT.from_pretrained and save_pretrained."""

import json
import os

import pytest
import torch

from data.formats import DataError
from data.tokenizer import HFTokenizer, get_tokenizer, hh_messages, render_chat

tokenizers = pytest.importorskip("tokenizers")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
CORPUS = ["Human: What is two plus two? Assistant: Four.", "The quick brown fox jumps over the lazy dog.",
          "naïve café, Grüße, 東京", "def f(x):\n    return x + 1\n"] * 20

CHATML = (  # Qwen's layout: a default system message, loop controls
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}\n"
    "{%- for message in messages %}{%- if message.role == 'system' and loop.first %}{%- continue %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")
LLAMA3 = (  # Llama 3 Instruct's: bos_token, the trim filter
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
BLOCKS = (  # whitespace that trim_blocks / lstrip_blocks decide, raise_exception, tojson without HTML escaping
    "{% for message in messages %}\n"
    "    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {% endif %}\n"
    "    [{{ message['role'] }}] {{ message['content'] | tojson }}{{ eos_token }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}[assistant]{% endif %}")
HH = ("\n\nHuman: What's 2+2? Answer <b>briefly</b>, s'il vous plaît.\n\nAssistant: 4.\n\n"
      "Human: And Human: 3+3?\n\nAssistant:")  # a literal "Human:" inside a turn stays text


def make_tokenizer_dir(path, chat_template=None, template_file=False, **tokenizer_config):
    """A byte-level BPE of 400 tokens trained on CORPUS, saved as tokenizer.json, with a
    tokenizer_config.json (EOS <|im_end|> unless told otherwise)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    os.makedirs(path, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", **tokenizer_config}
    if chat_template and template_file:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(chat_template)
    elif chat_template:
        config["chat_template"] = chat_template
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({k: v for k, v in config.items() if v is not None}, f)
    return str(path)


@pytest.fixture
def tok_dir(tmp_path):
    path = make_tokenizer_dir(tmp_path / "tok", CHATML)
    yield path
    get_tokenizer.cache_clear()


@pytest.mark.parametrize("text", [
    "Hello world",
    "\n\nHuman: What is 2 + 2?\n\nAssistant: 4.",
    "naïve café, Grüße, 東京, Привет 🤖",
    "  leading spaces and trailing\t\n",
    "user text that says <|im_end|> and <|endoftext|>",
])
def test_round_trips(tok_dir, text):
    enc = get_tokenizer(tok_dir)
    assert isinstance(enc, HFTokenizer) and enc.name == tok_dir
    ids = enc.encode(text, disallowed_special=())
    assert enc.decode(ids) == text
    assert enc.eot_token not in ids  # user text is never EOS
    assert max(ids) < enc.n_vocab


def test_special_tokens_only_where_allowed(tok_dir):
    enc = get_tokenizer(tok_dir)
    im_end = enc.tokenizer.token_to_id("<|im_end|>")
    assert enc.eot_token == im_end and enc.pad_token == enc.tokenizer.token_to_id("<|endoftext|>")
    assert enc.bos_token == enc.tokenizer.token_to_id("<|begin_of_text|>")
    assert enc.encode("Four.<|im_end|>", allowed_special="all")[-1] == im_end
    assert im_end not in enc.encode("Four.<|im_end|>", disallowed_special=())
    with pytest.raises(ValueError, match="special token '<\\|im_end\\|>'"):
        enc.encode("Four.<|im_end|>")  # tiktoken's default: refused
    assert enc.n_vocab == enc.tokenizer.get_vocab_size() > len(SPECIALS) + 256  # the bytes, the specials, the merges


def test_eos_from_the_directory_configs(tmp_path):
    path = make_tokenizer_dir(tmp_path, eos_token=None, pad_token=None)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"eos_token_id": 7}, f)
    assert HFTokenizer(path).eot_token == 7
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [5, 6]}, f)  # generation_config.json before config.json; a list gives its first
    enc = HFTokenizer(path)
    assert enc.eot_token == 5 and enc.pad_token == 5  # no pad named: EOS pads
    os.remove(tmp_path / "generation_config.json")
    os.remove(tmp_path / "config.json")
    with pytest.raises(DataError, match="names no EOS token"):
        HFTokenizer(path)


def test_refusals(tmp_path):
    with pytest.raises(DataError, match="no tokenizer.json"):
        get_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="gpt2, or a directory holding tokenizer.json"):
        get_tokenizer("llama-3")


# ----------------------------------------------------------------------------- chat templates

def test_hh_messages():
    assert hh_messages(HH) == [
        {"role": "user", "content": "What's 2+2? Answer <b>briefly</b>, s'il vous plaît."},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And Human: 3+3?"}]
    assert hh_messages("\n\nHuman: Hi\n\nAssistant: Hello!")[-1] == {"role": "assistant", "content": "Hello!"}
    with pytest.raises(ValueError, match="not an HH-RLHF dialogue"):
        hh_messages("Hi there")


@pytest.mark.parametrize("template, template_file", [(CHATML, False), (LLAMA3, False), (BLOCKS, True)])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_as_transformers(tmp_path, template, template_file, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    path = make_tokenizer_dir(tmp_path, template, template_file=template_file)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(path)
    for messages in (hh_messages(HH), [{"role": "system", "content": "Be brief."}, *hh_messages(HH)]):
        try:
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # BLOCKS refuses a system turn: so must we
            with pytest.raises(type(e), match="roles must alternate"):
                render_chat(path, messages, add_generation_prompt)
            continue
        text = render_chat(HFTokenizer(path), messages, add_generation_prompt)
        assert text == expected
        assert HFTokenizer(path).encode(text, allowed_special="all") == hf.encode(text, add_special_tokens=False)


def test_no_chat_template_says_so(tok_dir, tmp_path):
    path = make_tokenizer_dir(tmp_path / "plain")
    with pytest.raises(DataError, match="has no chat template"):
        render_chat(path, hh_messages(HH))


def test_chat_template_switched_on_renders_every_prompt(tmp_path):
    from data.tokenizer import encode_examples, encode_prompt, use_chat_template
    from rollout import encode_prompts
    enc = HFTokenizer(make_tokenizer_dir(tmp_path, CHATML))
    plain = encode_prompt(enc, HH)
    use_chat_template(enc, True)
    chat = enc.encode(render_chat(enc, hh_messages(HH)), allowed_special="all")
    assert encode_prompt(enc, HH) == chat != plain
    assert encode_prompts(enc, [HH], 1000) == [chat]  # PPO's, sample.py's and eval.py's prompts
    assert encode_examples(enc, [{"prompt": HH, "response": " Six."}], 1000)[0][0] == chat  # SFT's, the reward model's, DPO's
    one_turn = enc.encode(render_chat(enc, [{"role": "user", "content": "Hi there"}]), allowed_special="all")
    assert encode_prompt(enc, "Hi there ") == one_turn  # any other text: one user turn
    use_chat_template(enc, False)
    assert encode_prompt(enc, HH) == plain
    with pytest.raises(DataError, match="has no chat template"):
        use_chat_template(get_tokenizer("task"), True)
    with pytest.raises(DataError, match="has no chat template"):
        use_chat_template(HFTokenizer(make_tokenizer_dir(tmp_path / "plain")), True)


# ----------------------------------------------------------------------------- a model directory with its tokenizer

def test_model_directory_carries_its_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from model import GPT
    src = tmp_path / "src"
    config = transformers.LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=32, eos_token_id=4, bos_token_id=3)
    transformers.LlamaForCausalLM(config).save_pretrained(src)
    make_tokenizer_dir(src, LLAMA3)
    model = GPT.from_pretrained(str(src))
    assert model.config.tokenizer == os.path.abspath(src)
    enc = get_tokenizer(model.config.tokenizer)
    assert enc.n_vocab <= model.config.vocab_size
    model.save_pretrained(tmp_path / "out")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert os.path.exists(tmp_path / "out" / file)
    with open(tmp_path / "out" / "config.json") as f:
        saved = json.load(f)
    assert saved["eos_token_id"] == 4 and saved["bos_token_id"] == 3 and "minrlhf_tokenizer" not in saved
    again = GPT.from_pretrained(str(tmp_path / "out"))
    assert again.config.tokenizer == os.path.abspath(tmp_path / "out")
    prompt = render_chat(again.config.tokenizer, hh_messages(HH))
    assert prompt == transformers.AutoTokenizer.from_pretrained(tmp_path / "out").apply_chat_template(
        hh_messages(HH), tokenize=False, add_generation_prompt=True)
    get_tokenizer.cache_clear()
    assert torch.equal(again.state_dict()["transformer.wte.weight"], model.state_dict()["transformer.wte.weight"])
