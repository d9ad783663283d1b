"""Load a checkpoint's tokenizer behind one small typed interface.

Two published layouts:
- `tokenizer.json` + `tokenizer_config.json` (DeepSeek-V3/R1, our toy checkpoints): loaded as a
  plain `PreTrainedTokenizerFast` with the special tokens, `add_bos_token` and `chat_template` of
  `tokenizer_config.json`. The config's `tokenizer_class` is deliberately ignored: DeepSeek names
  `LlamaTokenizerFast`, and newer transformers rebuild that class's pipeline around its
  SentencePiece conventions instead of the byte-level BPE that `tokenizer.json` describes.
- `tiktoken.model` + custom tokenizer code (Kimi K2): only through
  `AutoTokenizer.from_pretrained(dir, trust_remote_code=True)`, and only when the caller allows it.

BOS/EOS are added by this wrapper from the config's `add_bos_token`/`add_eos_token` (when the
config does not say, from what the tokenizer itself adds), so the answer does not depend on how a
transformers version treats post-processors. Chat prompts are rendered to text by the checkpoint's
template and encoded without adding anything (the template writes BOS itself).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TIKTOKEN_MODEL = "tiktoken.model"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class TokenizerSettings:
    """What `tokenizer_config.json` says (None where it says nothing)."""

    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    chat_template: str | dict[str, str] | None = None  # a dict holds named templates
    model_max_length: int | None = None
    clean_up_tokenization_spaces: bool = False

    @classmethod
    def from_dir(cls, model_dir: Path) -> TokenizerSettings:
        path = model_dir / TOKENIZER_CONFIG
        raw: dict[str, Any] = {}
        if path.is_file():
            raw = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        template = raw.get("chat_template")
        if template is None and (model_dir / CHAT_TEMPLATE_FILE).is_file():
            template = (model_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        elif isinstance(template, list):  # [{"name": ..., "template": ...}], as transformers saves several
            template = {entry["name"]: entry["template"] for entry in template}
        max_len = raw.get("model_max_length")
        return cls(
            bos_token=_token_text(raw.get("bos_token"), "bos_token", path),
            eos_token=_token_text(raw.get("eos_token"), "eos_token", path),
            pad_token=_token_text(raw.get("pad_token"), "pad_token", path),
            unk_token=_token_text(raw.get("unk_token"), "unk_token", path),
            add_bos_token=_optional_bool(raw.get("add_bos_token"), "add_bos_token", path),
            add_eos_token=_optional_bool(raw.get("add_eos_token"), "add_eos_token", path),
            chat_template=template,
            model_max_length=int(max_len) if isinstance(max_len, (int, float)) else None,
            clean_up_tokenization_spaces=bool(raw.get("clean_up_tokenization_spaces", False)),
        )


class Tokenizer:
    """A loaded tokenizer: encode/decode, chat rendering and special-token ids."""

    def __init__(self, backend: Any, settings: TokenizerSettings) -> None:
        self._hf = backend
        self._settings = settings
        if settings.add_bos_token is None or settings.add_eos_token is None:
            prefix, suffix = _probe_added_ids(backend)
        if settings.add_bos_token is not None:
            prefix = [self.bos_token_id] if settings.add_bos_token and self.bos_token_id is not None else []
        if settings.add_eos_token is not None:
            suffix = [self.eos_token_id] if settings.add_eos_token and self.eos_token_id is not None else []
        self._prefix_ids: list[int] = prefix
        self._suffix_ids: list[int] = suffix
        added = getattr(backend, "added_tokens_decoder", {}) or {}
        special = {int(i) for i, tok in added.items() if getattr(tok, "special", False)}
        self._special_ids = sorted(special | set(backend.all_special_ids))
        # Decoding runs once or twice per generated token: call the Rust tokenizer directly when
        # transformers would add nothing (no space clean-up), skipping its Python layers.
        raw = getattr(backend, "backend_tokenizer", None)
        self._raw = raw if raw is not None and not settings.clean_up_tokenization_spaces else None
        self._raw_decode = self._raw.decode if self._raw is not None else None
        # Encoding too: transformers' fast tokenizer runs the same Rust pipeline under several Python
        # layers (about 10x the time for a short prompt, on the router's event loop).
        self._raw_encode = raw.encode if raw is not None else None

    @property
    def backend(self) -> Any:
        """The underlying transformers tokenizer (escape hatch; prefer the methods here)."""
        return self._hf

    @property
    def settings(self) -> TokenizerSettings:
        return self._settings

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._raw_encode is not None:
            ids = self._raw_encode(text, add_special_tokens=False).ids
        else:
            ids = list(self._hf.encode(text, add_special_tokens=False))
        if add_special_tokens:
            ids = self._prefix_ids + ids + self._suffix_ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # Space clean-up follows the config: the backend was built with its setting.
        if self._raw_decode is not None:
            return self._raw_decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> Callable[[int], str | None] | None:
        """A per-token streaming decoder (tokenizers' DecodeStream): each call takes one id and
        returns the text it completes, or None while a character is incomplete. None when this
        tokenizer has no Rust backend to stream with."""
        if self._raw is None:
            return None
        from tokenizers.decoders import DecodeStream

        stream, raw = DecodeStream(skip_special_tokens=skip_special_tokens), self._raw
        return lambda token_id: stream.step(raw, token_id)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text the checkpoint's chat template makes of `messages` (extra template
        variables, e.g. `thinking=False`, go through `kwargs`)."""
        if not self.has_chat_template:
            raise ValueError(
                "this checkpoint's tokenizer has no chat template (no `chat_template` in "
                f"{TOKENIZER_CONFIG} and no {CHAT_TEMPLATE_FILE}); send a plain prompt instead"
            )
        text = self._hf.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
        )
        if not isinstance(text, str):
            raise TypeError(f"chat template rendered {type(text).__name__}, expected str")
        return text

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of `render_chat(...)`; BOS comes from the template, nothing is added."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)
        return self.encode(text, add_special_tokens=False)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._hf, "chat_template", None))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return len(self._hf)

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._hf.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self._hf.pad_token_id

    @property
    def all_special_ids(self) -> list[int]:
        """Ids that `decode(..., skip_special_tokens=True)` drops, sorted."""
        return list(self._special_ids)

    @property
    def model_max_length(self) -> int | None:
        return self._settings.model_max_length

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return list(self._hf.convert_ids_to_tokens(list(ids)))

    def token_to_id(self, token: str) -> int | None:
        """Id of a single vocabulary entry (e.g. `"</think>"`), or None if it is not one."""
        tid = self._hf.convert_tokens_to_ids(token)
        unk = self._hf.unk_token_id
        return None if tid is None or (tid == unk and token != self._hf.unk_token) else int(tid)

    def __len__(self) -> int:
        return self.vocab_size


def load_tokenizer(model_dir: str | Path, *, trust_remote_code: bool = False) -> Tokenizer:
    """Load the tokenizer of the checkpoint in `model_dir` (see the module doc for layouts)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {model_dir} does not exist")
    settings = TokenizerSettings.from_dir(model_dir)
    if (model_dir / TOKENIZER_JSON).is_file():
        return Tokenizer(_load_fast(model_dir, settings), settings)
    if (model_dir / TIKTOKEN_MODEL).is_file() or _has_custom_tokenizer_code(model_dir):
        if not trust_remote_code:
            raise ValueError(
                f"{model_dir} ships its tokenizer as {TIKTOKEN_MODEL} plus custom Python code "
                "(as Kimi K2 does); loading it runs that code, so pass trust_remote_code=True "
                "(CLI: --trust-remote-code) if you trust this checkpoint"
            )
        from transformers import AutoTokenizer

        return Tokenizer(AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True), settings)
    raise FileNotFoundError(
        f"no tokenizer in {model_dir}: looked for {TOKENIZER_JSON} (with {TOKENIZER_CONFIG}) "
        f"and for {TIKTOKEN_MODEL} with custom tokenizer code"
    )


def _load_fast(model_dir: Path, settings: TokenizerSettings) -> Any:
    from transformers import PreTrainedTokenizerFast

    kwargs: dict[str, Any] = {
        name: value
        for name in ("bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "add_eos_token")
        if (value := getattr(settings, name)) is not None
    }
    if settings.chat_template is not None:
        kwargs["chat_template"] = settings.chat_template
    if settings.model_max_length is not None:
        kwargs["model_max_length"] = settings.model_max_length
    return PreTrainedTokenizerFast(
        tokenizer_file=str(model_dir / TOKENIZER_JSON),
        name_or_path=str(model_dir),
        clean_up_tokenization_spaces=settings.clean_up_tokenization_spaces,
        **kwargs,
    )


def _has_custom_tokenizer_code(model_dir: Path) -> bool:
    path = model_dir / TOKENIZER_CONFIG
    if not path.is_file():
        return False
    auto_map = json.loads(path.read_text(encoding="utf-8")).get("auto_map") or {}
    return isinstance(auto_map, dict) and "AutoTokenizer" in auto_map


def _probe_added_ids(backend: Any) -> tuple[list[int], list[int]]:
    """The ids the backend itself puts before and after a text (for configs that do not say)."""
    bare = list(backend.encode("a", add_special_tokens=False))
    full = list(backend.encode("a", add_special_tokens=True))
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


def _token_text(value: Any, field: str, path: Path) -> str | None:
    """`"<s>"` or `{"content": "<s>", ...}` (a serialised AddedToken) -> `"<s>"`."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{path}: {field} must be a string or an object with 'content', got {value!r}")


def _optional_bool(value: Any, field: str, path: Path) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise ValueError(f"{path}: {field} must be true or false, got {value!r}")
