"""Tokenizer loading, the toy-checkpoint tokenizer writer, chat templates and streaming detokenization."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moecluster.workers.checkpoint.tiny_tokenizer import ARCH_TOKENS, write_tiny_tokenizer
from moecluster.text.detokenizer import IncrementalDetokenizer
from moecluster.text.tokenizer import Tokenizer, load_tokenizer

ARCHS = ["deepseek-v3", "kimi-k2"]
TEXTS = {
    "ascii": "Hello, world! The quick brown fox jumps over 13 lazy dogs.",
    "code": 'def add(a: int, b: int) -> int:\n\treturn a + b  # {"x": [1, 2]}\n\n',
    "cjk": "混合专家模型很快。トークン、안녕하세요!",
    "emoji": "ok 😀🚀 👍🏽 family: 👨‍👩‍👧 flag: 🇯🇵 ❤️",
    "mixed": "  leading spaces, Café naïve Привет 你好😀\n  trailing  ",
}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 6*7?"},
    {
        "role": "assistant",
        "content": "<think>multiply</think>Let me check.",
        "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": {"expr": "6*7"}}}],
    },
    {"role": "tool", "content": "42"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": [{"type": "text", "text": "Thanks 😀"}]},
]
DS_BOS, DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    dirs = {}
    for arch in ARCHS:
        dirs[arch] = root / arch
        assert write_tiny_tokenizer(dirs[arch], arch) == 1024  # type: ignore[arg-type]
    return dirs


@pytest.fixture(scope="module")
def toks(tiny_dirs: dict[str, Path]) -> dict[str, Tokenizer]:
    return {arch: load_tokenizer(path) for arch, path in tiny_dirs.items()}


# --- the writer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_written_files_are_deterministic(tmp_path: Path, tiny_dirs: dict[str, Path], arch: str) -> None:
    write_tiny_tokenizer(tmp_path, arch)  # type: ignore[arg-type]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny_dirs[arch] / name).read_bytes(), name


def test_writer_vocab_size_and_errors(tmp_path: Path) -> None:
    assert write_tiny_tokenizer(tmp_path / "a", "deepseek-v3", vocab_size=512) == 512
    assert len(load_tokenizer(tmp_path / "a")) == 512
    with pytest.raises(ValueError, match="too small"):
        write_tiny_tokenizer(tmp_path / "b", "kimi-k2", vocab_size=260)
    with pytest.raises(ValueError, match="unknown tokenizer arch"):
        write_tiny_tokenizer(tmp_path / "c", "llama")  # type: ignore[arg-type]


def test_config_fields(tiny_dirs: dict[str, Path]) -> None:
    ds = json.loads((tiny_dirs["deepseek-v3"] / "tokenizer_config.json").read_text())
    kimi = json.loads((tiny_dirs["kimi-k2"] / "tokenizer_config.json").read_text())
    assert ds["tokenizer_class"] == kimi["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (ds["add_bos_token"], kimi["add_bos_token"]) == (True, False)
    assert (ds["bos_token"], ds["eos_token"]) == (DS_BOS, DS_EOS)
    assert (kimi["bos_token"], kimi["eos_token"]) == ("[BOS]", "<|im_end|>")
    assert ds["model_max_length"] > 0 and ds["chat_template"] and kimi["chat_template"]


# --- encode / decode / special tokens -------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_round_trip(toks: dict[str, Tokenizer], arch: str, kind: str) -> None:
    tok, text = toks[arch], TEXTS[kind]
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_bos_follows_config(toks: dict[str, Tokenizer]) -> None:
    ds, kimi = toks["deepseek-v3"], toks["kimi-k2"]
    assert (ds.bos_token_id, ds.eos_token_id) == (0, 1)  # DeepSeek-V3's layout
    assert ds.encode("hi")[0] == 0 and ds.encode("hi", add_special_tokens=False)[0] != 0
    assert kimi.encode("hi") == kimi.encode("hi", add_special_tokens=False)
    assert kimi.convert_ids_to_tokens([kimi.bos_token_id, kimi.eos_token_id]) == ["[BOS]", "<|im_end|>"]


@pytest.mark.parametrize("arch", ARCHS)
def test_special_tokens_are_single_ids(toks: dict[str, Tokenizer], arch: str) -> None:
    tok, spec = toks[arch], ARCH_TOKENS[arch]
    for token in {spec.bos, spec.eos, *spec.control, *spec.content}:
        ids = tok.encode(token, add_special_tokens=False)
        assert len(ids) == 1, token
        assert tok.convert_ids_to_tokens(ids) == [token]
        assert tok.token_to_id(token) == ids[0]
        # control tokens vanish from skip_special_tokens decoding; content markers stay
        assert (ids[0] in tok.all_special_ids) == (token in spec.control)
        assert tok.decode(ids, skip_special_tokens=False) == token
    assert tok.token_to_id("not a single token") is None


# --- chat templates -------------------------------------------------------------------------------


def test_deepseek_chat_template(toks: dict[str, Tokenizer]) -> None:
    tok = toks["deepseek-v3"]
    text = tok.render_chat(CONVERSATION, tools=TOOLS)
    tool_json = json.dumps(TOOLS[0])
    assert text == (
        f"{DS_BOS}Be brief.\n\n# Functions you may call (JSON schema, one per line)\n{tool_json}"
        "<｜User｜>What is 6*7?"
        "<｜Assistant｜>Let me check."
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>calc"
        '\n```json\n{"expr": "6*7"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>'
        "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>42"
        "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
        "<｜Assistant｜>42<｜end▁of▁sentence｜>"
        "<｜User｜>Thanks 😀<｜Assistant｜><think>\n"
    )
    plain = [{"role": "user", "content": "hi"}]
    assert tok.render_chat(plain, thinking=False) == f"{DS_BOS}<｜User｜>hi<｜Assistant｜>"
    assert tok.render_chat(plain, add_generation_prompt=False) == f"{DS_BOS}<｜User｜>hi"
    ids = tok.apply_chat_template(plain)
    assert ids[:2] == [tok.bos_token_id, tok.token_to_id("<｜User｜>")]  # exactly one BOS
    assert ids[-2:] == [tok.token_to_id("<think>"), *tok.encode("\n", add_special_tokens=False)]


def test_kimi_chat_template(toks: dict[str, Tokenizer]) -> None:
    tok = toks["kimi-k2"]
    text = tok.render_chat(CONVERSATION[1:], tools=TOOLS)
    assert text == (
        f"<|im_system|>tool_declare<|im_middle|>{json.dumps(TOOLS)}<|im_end|>"
        "<|im_system|>system<|im_middle|>You are a helpful assistant.<|im_end|>"
        "<|im_user|>user<|im_middle|>What is 6*7?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>multiply</think>Let me check."
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.calc:0<|tool_call_argument_begin|>"
        '{"expr": "6*7"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
        "<|im_system|>tool<|im_middle|>42<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>42<|im_end|>"
        "<|im_user|>user<|im_middle|>Thanks 😀<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )
    with_system = tok.render_chat(CONVERSATION[:2], add_generation_prompt=False)
    assert with_system == (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
        "<|im_user|>user<|im_middle|>What is 6*7?<|im_end|>"
    )
    ids = tok.apply_chat_template(CONVERSATION[:2])
    assert tok.bos_token_id not in ids
    assert ids[0] == tok.token_to_id("<|im_system|>") and ids[-1] == tok.token_to_id("<|im_middle|>")


@pytest.mark.parametrize("arch", ARCHS)
def test_unknown_role_is_an_error(toks: dict[str, Tokenizer], arch: str) -> None:
    with pytest.raises(Exception, match="unsupported message role: narrator"):
        toks[arch].render_chat([{"role": "narrator", "content": "x"}])


# --- agreement with transformers ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_agrees_with_auto_tokenizer(
    tiny_dirs: dict[str, Path], toks: dict[str, Tokenizer], arch: str
) -> None:
    from transformers import AutoTokenizer

    ref, tok = AutoTokenizer.from_pretrained(str(tiny_dirs[arch])), toks[arch]
    for text in [*TEXTS.values(), "<think>x</think><|im_end|><｜User｜>"]:
        assert tok.encode(text) == list(ref.encode(text)), text
        assert tok.encode(text, add_special_tokens=False) == list(ref.encode(text, add_special_tokens=False))
    ids = tok.apply_chat_template(CONVERSATION, tools=TOOLS)
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    rendered = ref.apply_chat_template(CONVERSATION, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert tok.render_chat(CONVERSATION, tools=TOOLS) == rendered
    assert tok.vocab_size == len(ref)
    assert (tok.bos_token_id, tok.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)


# --- incremental detokenization -------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], skip: bool) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = [detok.add(i) for i in ids]
    tail = detok.flush()
    assert detok.text == "".join(deltas) + tail and detok.token_ids == ids
    return deltas, tail


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("skip", [True, False])
def test_incremental_matches_full_decode(toks: dict[str, Tokenizer], arch: str, skip: bool) -> None:
    tok = toks[arch]
    streams = [tok.encode(t) for t in TEXTS.values()] + [tok.apply_chat_template(CONVERSATION, tools=TOOLS)]
    for ids in streams:
        deltas, tail = _stream(tok, ids, skip)
        assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in d for d in deltas) and tail == ""


def test_split_characters_are_held_back(toks: dict[str, Tokenizer]) -> None:
    tok = toks["deepseek-v3"]
    ids = tok.encode("😀🚀", add_special_tokens=False)
    # the emoji really are split across tokens, so holding back is exercised
    assert any("\ufffd" in tok.decode([i]) for i in ids) and len(ids) > 2
    deltas, _ = _stream(tok, ids, skip=True)
    assert "" in deltas and [d for d in deltas if d] in (["😀", "🚀"], ["😀🚀"])
    # a sequence cut mid-character: nothing mid-stream, the broken tail only at flush
    detok = IncrementalDetokenizer(tok)
    assert detok.add_many(ids[:1]) == ""
    assert detok.flush() == tok.decode(ids[:1])


# --- loading errors and published layouts ---------------------------------------------------------


def test_empty_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*tiktoken.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_tiktoken_needs_trust_remote_code(
    tmp_path: Path, tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kimi K2's layout: tiktoken.model + custom code named in auto_map, no tokenizer.json."""
    (tmp_path / "tiktoken.model").write_text("")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}})
    )
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_tokenizer(tmp_path)

    # With consent it goes through AutoTokenizer(trust_remote_code=True); stand in for the custom
    # code (which needs the `tiktoken` package) with our toy tokenizer.
    import transformers

    calls: list[tuple[str, bool]] = []

    def fake_from_pretrained(path: str, trust_remote_code: bool = False, **_: object) -> object:
        calls.append((path, trust_remote_code))
        return transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(tiny_dirs["kimi-k2"] / "tokenizer.json"), eos_token="<|im_end|>"
        )

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    tok = load_tokenizer(tmp_path, trust_remote_code=True)
    assert calls == [(str(tmp_path), True)]
    assert tok.decode(tok.encode(TEXTS["emoji"])) == TEXTS["emoji"]
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>")


def test_missing_chat_template_is_a_clear_error(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    shutil.copy(tiny_dirs["kimi-k2"] / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tok = load_tokenizer(tmp_path)
    assert tok.decode(tok.encode("abc")) == "abc" and not tok.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_deepseek_style_config(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    """DeepSeek-V3 publishes its special tokens as AddedToken objects and names LlamaTokenizerFast."""
    shutil.copy(tiny_dirs["deepseek-v3"] / "tokenizer.json", tmp_path)
    config = json.loads((tiny_dirs["deepseek-v3"] / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token"):
        config[key] = {"__type": "AddedToken", "content": config[key], "lstrip": False, "normalized": True,
                       "rstrip": False, "single_word": False}
    config["tokenizer_class"] = "LlamaTokenizerFast"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.encode(TEXTS["code"])[0] == 0 and tok.decode(tok.encode(TEXTS["code"])) == TEXTS["code"]
