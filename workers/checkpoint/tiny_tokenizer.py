"""A small trained byte-level BPE tokenizer for toy checkpoints (`moecluster make-tiny`).

The real checkpoints ship a 129280-token (DeepSeek-V3/R1) or 163840-token (Kimi K2) vocabulary;
a toy model needs the same *kind* of tokenizer at a size that matches its tiny embedding table:
byte-level BPE (so any text round-trips), the architecture's special tokens as single ids, and a
chat template that renders the architecture's turn format.

Layout of the written ids mirrors the real checkpoints:
- deepseek-v3: BOS = 0 and EOS = 1 (trained in as the first tokens), BPE tokens, then the other
  added tokens at the end.
- kimi-k2: BPE tokens first, every added token at the end (`[BOS]` is the first of them).

Control tokens (BOS/EOS, role and turn markers) are `special` and vanish under
`decode(skip_special_tokens=True)`; `<think>`, `</think>` and the tool-call markers are plain added
tokens (still single ids) so reasoning and tool-call parsers downstream can see them in text.

Same arguments, same bytes: the corpus is a fixed string built here, the BPE trainer breaks ties
deterministically, and both files are serialised in a fixed order.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

Arch = Literal["deepseek-v3", "kimi-k2"]

# Chat templates (Jinja, rendered by transformers' `apply_chat_template`). `content` may be a
# string, None, or a list of `{"type": "text", "text": ...}` parts.
_TEXT_MACRO = r"""{%- macro text(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is iterable -%}{%- for part in content if part.type == 'text' -%}{{ part.text }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- macro arguments(f) -%}
{%- if f.arguments is string -%}{{ f.arguments }}{%- else -%}{{ f.arguments | tojson }}{%- endif -%}
{%- endmacro -%}
"""

# BOS, system text (all system messages, then the tool list), user/assistant turns; past
# assistant turns drop their reasoning (text up to `</think>`); consecutive tool results share
# one outputs block. The generation prompt opens a thinking block unless `thinking=False`.
DEEPSEEK_V3_TEMPLATE = _TEXT_MACRO + r"""{%- set ns = namespace(system='', in_outputs=false) -%}
{%- for m in messages if m.role == 'system' -%}
{%- set ns.system = ns.system + ('\n\n' if ns.system else '') + text(m.content) -%}
{%- endfor -%}
{%- if tools -%}
{%- set ns.system = ns.system + ('\n\n' if ns.system else '') + '# Functions you may call (JSON schema, one per line)' -%}
{%- for tool in tools -%}{%- set ns.system = ns.system + '\n' + (tool | tojson) -%}{%- endfor -%}
{%- endif -%}
{{ bos_token }}{{ ns.system }}
{%- for m in messages -%}
{%- if m.role != 'tool' and ns.in_outputs -%}<｜tool▁outputs▁end｜>{%- set ns.in_outputs = false -%}{%- endif -%}
{%- if m.role == 'user' -%}
<｜User｜>{{ text(m.content) }}
{%- elif m.role == 'assistant' -%}
<｜Assistant｜>{{ text(m.content).split('</think>')[-1] }}
{%- if m.tool_calls -%}
<｜tool▁calls▁begin｜>
{%- for call in m.tool_calls -%}
{%- set f = call.function if call.function is defined else call -%}
<｜tool▁call▁begin｜>{{ call.type or 'function' }}<｜tool▁sep｜>{{ f.name }}{{ '\n```json\n' }}{{ arguments(f) }}{{ '\n```' }}<｜tool▁call▁end｜>
{%- endfor -%}
<｜tool▁calls▁end｜>
{%- endif -%}
<｜end▁of▁sentence｜>
{%- elif m.role == 'tool' -%}
{%- if not ns.in_outputs -%}<｜tool▁outputs▁begin｜>{%- set ns.in_outputs = true -%}{%- endif -%}
<｜tool▁output▁begin｜>{{ text(m.content) }}<｜tool▁output▁end｜>
{%- elif m.role != 'system' -%}
{{ raise_exception('unsupported message role: ' ~ m.role) }}
{%- endif -%}
{%- endfor -%}
{%- if ns.in_outputs -%}<｜tool▁outputs▁end｜>{%- endif -%}
{%- if add_generation_prompt -%}
<｜Assistant｜>{%- if thinking is not defined or thinking -%}{{ '<think>\n' }}{%- endif -%}
{%- endif -%}
"""

# Every message is `<|im_ROLE|>NAME<|im_middle|>CONTENT<|im_end|>`; tool results travel as system
# messages named `tool`, the tool list as a leading system message named `tool_declare`.
KIMI_K2_TEMPLATE = _TEXT_MACRO + r"""{%- if tools -%}
<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>
{%- endif -%}
{%- if not messages or messages[0].role != 'system' -%}
<|im_system|>system<|im_middle|>You are a helpful assistant.<|im_end|>
{%- endif -%}
{%- for m in messages -%}
{%- if m.role == 'system' -%}
<|im_system|>{{ m.name or 'system' }}<|im_middle|>{{ text(m.content) }}<|im_end|>
{%- elif m.role == 'user' -%}
<|im_user|>{{ m.name or 'user' }}<|im_middle|>{{ text(m.content) }}<|im_end|>
{%- elif m.role == 'assistant' -%}
<|im_assistant|>{{ m.name or 'assistant' }}<|im_middle|>{{ text(m.content) }}
{%- if m.tool_calls -%}
<|tool_calls_section_begin|>
{%- for call in m.tool_calls -%}
{%- set f = call.function if call.function is defined else call -%}
<|tool_call_begin|>{{ call.id or ('functions.' ~ f.name ~ ':' ~ loop.index0) }}<|tool_call_argument_begin|>{{ arguments(f) }}<|tool_call_end|>
{%- endfor -%}
<|tool_calls_section_end|>
{%- endif -%}
<|im_end|>
{%- elif m.role == 'tool' -%}
<|im_system|>tool<|im_middle|>{{ text(m.content) }}<|im_end|>
{%- else -%}
{{ raise_exception('unsupported message role: ' ~ m.role) }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_assistant|>assistant<|im_middle|>
{%- endif -%}
"""


def build_corpus() -> list[str]:
    """A fixed training corpus: English prose, Python/JSON code, numbers and non-ASCII text."""
    subjects = ["The router", "Each worker", "A decode rank", "The scheduler", "Our cache", "The model"]
    verbs = ["sends", "reads", "writes", "splits", "merges", "returns", "checks", "places"]
    objects = [
        "the next token", "a batch of requests", "latent blocks", "expert weights", "the prompt",
        "every layer", "new text", "an error message",
    ]
    lines = [
        f"{s} {v} {o} in step {i}, then waits for {(i * 7) % 13} more."
        for i, (s, v, o) in enumerate(itertools.product(subjects, verbs, objects))
    ]
    names = ["tokens", "experts", "blocks", "scores", "weights", "prompt_len", "batch_size", "hidden"]
    for i, name in enumerate(names):
        lines += [
            f"def get_{name}(self, index: int) -> list[int]:",
            f"    \"\"\"Return the {name.replace('_', ' ')} at `index`.\"\"\"",
            f"    if index < 0 or index >= len(self.{name}):",
            f"        raise IndexError(f\"{name} index {{index}} out of range\")",
            f"    return self.{name}[index] + [{i}, {i * 3}, {i * 11}]",
            f'{{"name": "{name}", "value": {i * 1.5}, "enabled": {str(i % 2 == 0).lower()}, '
            f'"ids": [{i}, {i + 1}]}}',
            f"for i in range({i + 2}):\n\tprint(i, {name}[i])  # {name} #{i}",
        ]
    lines += [
        "混合专家模型把每个词元路由到少数几个专家。",
        "今天天气很好，我们一起去公园散步吧。",
        "深度学习需要大量的数据和计算资源。",
        "トークナイザーは文章を小さな単位に分けます。",
        "안녕하세요, 만나서 반갑습니다.",
        "Привет, мир! Это проверка токенизатора.",
        "Καλημέρα κόσμε, αυτό είναι ένα τεστ.",
        "Café, naïve, façade, über, señor, smörgåsbord, Ångström.",
        "Emoji: 😀 🚀 🎉 👍 ❤️ 🔥 ✨ 🤖 — and symbols: € £ ¥ © ® ™ ± × ÷ ≤ ≥ ≠ ∞ → ←",
    ]
    return lines


@dataclass(frozen=True)
class ArchTokens:
    """Special tokens of one architecture and how its tokenizer config uses them."""

    bos: str
    eos: str  # the end-of-generation token for chat
    control: tuple[str, ...]  # special=True, skipped by decode(skip_special_tokens=True)
    content: tuple[str, ...]  # special=False, kept in decoded text
    leading: tuple[str, ...]  # control tokens trained in at ids 0.. (before the BPE tokens)
    add_bos_token: bool
    model_max_length: int
    chat_template: str


_DEEPSEEK_V3 = ArchTokens(
    bos="<｜begin▁of▁sentence｜>",
    eos="<｜end▁of▁sentence｜>",
    control=("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"),
    content=(
        "<think>",
        "</think>",
        "<｜tool▁calls▁begin｜>",
        "<｜tool▁calls▁end｜>",
        "<｜tool▁call▁begin｜>",
        "<｜tool▁call▁end｜>",
        "<｜tool▁sep｜>",
        "<｜tool▁outputs▁begin｜>",
        "<｜tool▁outputs▁end｜>",
        "<｜tool▁output▁begin｜>",
        "<｜tool▁output▁end｜>",
    ),
    leading=("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    add_bos_token=True,
    model_max_length=131072,
    chat_template=DEEPSEEK_V3_TEMPLATE,
)

_KIMI_K2 = ArchTokens(
    bos="[BOS]",
    eos="<|im_end|>",
    control=(
        "[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
    ),
    content=(
        "<think>",
        "</think>",
        "<|tool_calls_section_begin|>",
        "<|tool_calls_section_end|>",
        "<|tool_call_begin|>",
        "<|tool_call_argument_begin|>",
        "<|tool_call_end|>",
    ),
    leading=(),
    add_bos_token=False,
    model_max_length=131072,
    chat_template=KIMI_K2_TEMPLATE,
)

ARCH_TOKENS: dict[str, ArchTokens] = {"deepseek-v3": _DEEPSEEK_V3, "kimi-k2": _KIMI_K2}

_BYTE_ALPHABET = 256


def write_tiny_tokenizer(
    out_dir: Path,
    arch: Arch,
    vocab_size: int = 1024,
    *,
    model_max_length: int | None = None,
) -> int:
    """Train and write `tokenizer.json` + `tokenizer_config.json` into `out_dir`.

    `vocab_size` is the target total, special tokens included; the returned size is the real one
    (smaller only if the built-in corpus runs out of merges). `model_max_length` defaults to the
    real architecture's context length.
    """
    spec = _arch_tokens(arch)
    n_added = len(spec.control) + len(spec.content)
    if vocab_size < _BYTE_ALPHABET + n_added + 1:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for {arch}: the byte alphabet ({_BYTE_ALPHABET}) "
            f"plus {n_added} special tokens need at least {_BYTE_ALPHABET + n_added + 1}"
        )
    if model_max_length is not None and model_max_length <= 0:
        raise ValueError(f"model_max_length must be positive, got {model_max_length}")

    tokenizer = _train(spec, vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    config = _tokenizer_config(spec, model_max_length or spec.model_max_length)
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return tokenizer.get_vocab_size(with_added_tokens=True)


def special_token_ids(out_dir: Path) -> tuple[int, int]:
    """(bos, eos) ids of the tokenizer in out_dir, from its tokenizer_config.json's names and
    tokenizer.json's added tokens."""
    tok = json.loads((out_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((out_dir / "tokenizer_config.json").read_text())
    ids = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    return ids[_token_text(tok_cfg["bos_token"])], ids[_token_text(tok_cfg["eos_token"])]


def write_generation_config(out_dir: Path, bos: int, eos: int) -> None:
    gen = {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _token_text(entry: str | dict) -> str:
    return entry["content"] if isinstance(entry, dict) else entry


def _arch_tokens(arch: str) -> ArchTokens:
    try:
        return ARCH_TOKENS[arch]
    except KeyError:
        known = sorted(ARCH_TOKENS)
        raise ValueError(f"unknown tokenizer arch {arch!r}; expected one of {known}") from None


def _train(spec: ArchTokens, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    leading = [AddedToken(t, special=True, normalized=False) for t in spec.leading]
    later_control = [t for t in spec.control if t not in spec.leading]
    n_later = len(later_control) + len(spec.content)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_later,  # the trainer's count includes the leading tokens
        special_tokens=leading,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(build_corpus(), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in later_control])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.content])
    if spec.add_bos_token:
        # Also in tokenizer.json (as in DeepSeek-V3's), so any loader that ignores
        # `add_bos_token` still prepends BOS.
        bos_id = tokenizer.token_to_id(spec.bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A",
            pair=f"{spec.bos} $A {spec.bos} $B",
            special_tokens=[(spec.bos, bos_id)],
        )
    return tokenizer


def _tokenizer_config(spec: ArchTokens, model_max_length: int) -> dict[str, object]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec.bos,
        "eos_token": spec.eos,
        "add_bos_token": spec.add_bos_token,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": spec.chat_template,
    }
