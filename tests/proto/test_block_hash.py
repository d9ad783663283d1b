"""The block-hash wire spec: determinism, the chain property and a pinned value."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from moecluster.proto.block_hash import block_hashes, hash_block

TOKENS = [3, 141, 59, 26, 5358, 979, 32384, 62643, 129279, 163839, 7]  # 2 full blocks of 4 + 3


def test_pinned_values() -> None:
    # If this fails the wire format changed: routers and workers of different versions would
    # stop agreeing. Bump SPEC_VERSION and update these numbers on purpose, never by accident.
    assert hash_block(None, [1, 2, 3, 4]) == 8389267426393211399
    assert block_hashes(list(range(10)), 4, b"deepseek-v3") == [6339575835833197904, 4448088478257029930]


def test_matches_the_documented_encoding() -> None:
    extra, first, second = b"kimi-k2", [1, 2, 3], [2**32 - 1, 0, 65536]

    def spec(parent: bytes, tokens: list[int]) -> int:
        msg = parent + len(extra).to_bytes(4, "little") + extra + b"".join(t.to_bytes(4, "little") for t in tokens)
        return int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little")

    h0 = spec(bytes(8), first)
    h1 = spec(h0.to_bytes(8, "little"), second)
    assert block_hashes(first + second, 3, extra) == [h0, h1]
    assert 0 <= h0 < 2**64 and 0 <= h1 < 2**64


def test_deterministic_across_processes() -> None:
    code = "from moecluster.proto.block_hash import block_hashes; print(block_hashes(list(range(10)), 4, b'x'))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": seed}
        ).stdout
        for seed in ("1", "2")
    }
    assert outs == {f"{block_hashes(list(range(10)), 4, b'x')}\n"}


def test_chain_property() -> None:
    base = block_hashes(TOKENS, 2)
    assert len(base) == 5
    for i in range(5):
        changed = list(TOKENS)
        changed[2 * i + 1] += 1
        hashes = block_hashes(changed, 2)
        assert hashes[:i] == base[:i]
        assert all(a != b for a, b in zip(hashes[i:], base[i:]))


def test_partial_blocks_excluded() -> None:
    assert len(block_hashes(TOKENS, 4)) == 2
    assert block_hashes(TOKENS, 4) == block_hashes(TOKENS[:8], 4) == block_hashes(TOKENS[:10], 4)
    assert block_hashes(TOKENS[:3], 4) == []
    assert block_hashes([], 4) == []
    assert len(block_hashes(TOKENS, 1)) == len(TOKENS)


def test_extra_namespaces_hashes() -> None:
    a, b, c = block_hashes(TOKENS, 4), block_hashes(TOKENS, 4, b"model-a"), block_hashes(TOKENS, 4, b"model-b")
    assert not {*a} & {*b} and not {*b} & {*c} and not {*a} & {*c}
    # length prefix: moving a byte between extra and tokens cannot collide
    assert hash_block(None, [1], b"\x00") != hash_block(None, [1])


def test_block_hashes_is_the_chain_of_hash_block() -> None:
    h = None
    for i, expected in enumerate(block_hashes(TOKENS, 3, b"e")):
        h = hash_block(h, TOKENS[3 * i : 3 * i + 3], b"e")
        assert h == expected


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "7"])
def test_rejects_bad_token_ids(bad: object) -> None:
    with pytest.raises(ValueError, match="token id"):
        hash_block(None, [1, bad, 2])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="token id"):
        block_hashes([1, 2, bad, 4], 2)  # type: ignore[list-item]


def test_accepts_boundary_ids_and_rejects_bad_arguments() -> None:
    hash_block(None, [0, 2**32 - 1])
    hash_block(2**64 - 1, [0])
    with pytest.raises(ValueError, match="parent"):
        hash_block(2**64, [0])
    with pytest.raises(ValueError, match="parent"):
        hash_block(-1, [0])
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1, 2], 0)
