"""Block-hash spec for prefix caching: a wire contract shared by the router and the workers.

The router computes these hashes (without torch) to place a request where its prefix is cached;
the workers compute the same hashes to find cached latent blocks. Both sides must therefore
produce bit-identical values on every process and machine, so nothing here may depend on
Python's ``hash()``, the platform's byte order or the interpreter version.

Spec (version 1)
----------------
A prompt of token ids is cut into blocks of ``block_size`` tokens; only FULL blocks are hashed
(a trailing partial block has no hash). Block ``i`` has hash ``h_i`` defined as a chain::

    h_i = int.from_bytes(blake2b(message_i, digest_size=8).digest(), "little")   # unsigned 64-bit

    message_i = parent                          # 8 bytes
              + len(extra).to_bytes(4, "little")  # 4 bytes, unsigned
              + extra                           # len(extra) bytes
              + tokens                          # 4 bytes per token

- ``parent`` is ``h_{i-1}`` as 8 little-endian bytes, or 8 zero bytes for the first block (i = 0).
- ``extra`` is an opaque namespace (e.g. model and adapter identity) so that caches of different
  models never match; the same ``extra`` is used for every block of a chain. Empty by default.
- ``tokens`` are the block's token ids, in order, each a little-endian unsigned 32-bit integer.
  Ids outside ``[0, 2**32)`` are rejected with ``ValueError``.
- blake2b is used unkeyed, with no salt or personalisation, as in ``hashlib.blake2b``.

Because the parent hash is folded into every block, equal hashes at block ``i`` mean (up to
64-bit collisions) equal tokens in blocks ``0..i``. Changing this encoding changes every hash:
bump the version and update the pinned value in ``tests/proto/test_block_hash.py`` together.
"""

from __future__ import annotations

import hashlib
import operator
import struct
from collections.abc import Sequence

SPEC_VERSION = 1
_U64 = 2**64
_U32 = 2**32


def hash_block(parent: int | None, tokens: Sequence[int], extra: bytes = b"") -> int:
    """Hash of one block given its parent's hash (None for the first block). See module doc."""
    if parent is None:
        parent_bytes = bytes(8)
    elif isinstance(parent, int) and 0 <= parent < _U64:
        parent_bytes = parent.to_bytes(8, "little")
    else:
        raise ValueError(f"parent hash must be an unsigned 64-bit int or None, got {parent!r}")
    if len(extra) >= _U32:
        raise ValueError(f"extra is {len(extra)} bytes; the spec allows fewer than 2**32")
    try:
        token_bytes = struct.pack(f"<{len(tokens)}I", *tokens)
    except struct.error:
        bad = next((t for t in tokens if not _is_u32(t)), None)
        raise ValueError(f"token id {bad!r} is not an integer in [0, 2**32)") from None
    h = hashlib.blake2b(digest_size=8)
    h.update(parent_bytes)
    h.update(len(extra).to_bytes(4, "little"))
    h.update(extra)
    h.update(token_bytes)
    return int.from_bytes(h.digest(), "little")


def _is_u32(token: object) -> bool:
    try:
        return 0 <= operator.index(token) < _U32  # type: ignore[call-overload]
    except TypeError:
        return False


def block_hashes(token_ids: Sequence[int], block_size: int, extra: bytes = b"") -> list[int]:
    """The hash chain over every full block of ``token_ids``; a trailing partial block is skipped."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes: list[int] = []
    parent: int | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], extra)
        hashes.append(parent)
    return hashes
