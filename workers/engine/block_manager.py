"""Block bookkeeping for the paged latent cache, with prefix caching. Pure Python, no torch.

Every block is in exactly one of three states:
- referenced: ``ref > 0``, held by one or more block tables (shared prefix blocks, forks);
- free, never hashed (or evicted): in ``_fresh``, handed out first;
- free but cached: ``ref == 0`` with a registered hash, in ``_evictable`` (LRU order, oldest
  first); a prefix hit revives it, an allocation with no fresh block left evicts the oldest.

A block's hash is registered (``commit``) once it is full and every token in it is computed; from
then on its content never changes until it is evicted and handed out again. Hashes follow the
wire spec in ``moecluster.proto.block_hash`` so the router can predict hits.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from moecluster.proto.block_hash import hash_block


class OutOfBlocks(RuntimeError):
    pass


@dataclass
class BlockTable:
    """One sequence's view of the cache."""

    block_ids: list[int] = field(default_factory=list)  # in token order
    num_hashed: int = 0  # leading blocks whose hash is registered (full and computed)
    last_hash: int | None = None  # hash of block num_hashed - 1: the chain state for commit


@dataclass(frozen=True)
class CacheStats:
    num_blocks: int
    num_free_blocks: int  # refcount 0, including evictable cached blocks
    num_cached_blocks: int  # blocks with a registered hash, referenced or not
    usage: float  # fraction of blocks referenced
    prefix_queries: int  # tokens looked up by allocate_prefix
    prefix_hits: int  # tokens found cached
    evictions: int


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        hash_extra: bytes = b"",
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need positive num_blocks and block_size, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_extra = bytes(hash_extra)
        self._ref = [0] * num_blocks
        self._fresh: deque[int] = deque(range(num_blocks))  # free, no hash; low ids first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free with hash; oldest first
        self._block_of: dict[int, int] = {}  # hash -> block
        self._hash_of: dict[int, int] = {}  # block -> hash (inverse of _block_of)
        self._queries = self._hits = self._evictions = 0

    # ---- capacity -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._fresh) + len(self._evictable)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, table: BlockTable, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(table.block_ids))

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free_blocks

    def ref_count(self, block_id: int) -> int:
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block {block_id} out of range [0, {self.num_blocks})")
        return self._ref[block_id]

    # ---- allocation -----------------------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int]) -> tuple[list[int], list[int], int]:
        """Look up (no references taken, nothing counted) the cached blocks of the longest prefix of
        full blocks, leaving at least one token to compute: (block ids, their hashes, how many of
        them are unreferenced and would leave the free pool)."""
        if not self.enable_prefix_caching:
            return [], [], 0
        bs = self.block_size
        blocks: list[int] = []
        hashes: list[int] = []
        h = None
        for i in range(max(0, (len(token_ids) - 1) // bs)):  # leave >= 1 token to compute
            h = hash_block(h, token_ids[i * bs : (i + 1) * bs], self.hash_extra)
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
        return blocks, hashes, sum(1 for b in blocks if self._ref[b] == 0)

    def allocate_prefix(self, table: BlockTable, token_ids: Sequence[int]) -> int:
        """Reference the cached blocks of the longest cached prefix; returns cached tokens."""
        if table.block_ids:
            raise ValueError("allocate_prefix needs an empty block table")
        if not self.enable_prefix_caching:
            return 0
        blocks, hashes, _ = self.match_prefix(token_ids)
        for block in blocks:
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
        table.block_ids.extend(blocks)
        table.num_hashed, table.last_hash = len(blocks), (hashes[-1] if hashes else None)
        cached = len(blocks) * self.block_size
        self._queries += len(token_ids)
        self._hits += cached
        return cached

    def grow(self, table: BlockTable, num_tokens: int) -> None:
        """Append fresh blocks until the table holds num_tokens; all or nothing."""
        n = self.blocks_needed(table, num_tokens)
        if n > self.num_free_blocks:
            raise OutOfBlocks(f"need {n} blocks for {num_tokens} tokens, {self.num_free_blocks} free")
        table.block_ids.extend(self._take() for _ in range(n))

    def _take(self) -> int:
        if self._fresh:
            block = self._fresh.popleft()
        else:  # evict the least recently freed cached block
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
            self._evictions += 1
        self._ref[block] = 1
        return block

    def fork(self, table: BlockTable, num_tokens: int) -> tuple[BlockTable, list[tuple[int, int]]]:
        """Child table sharing the full blocks of the first num_tokens; a partial block is copied.

        Returns the child and the (src, dst) block copies the caller performs on the device.
        """
        if not 0 <= num_tokens <= len(table.block_ids) * self.block_size:
            raise ValueError(f"cannot fork {num_tokens} tokens from a table of {len(table.block_ids)} blocks")
        full, partial = divmod(num_tokens, self.block_size)
        if partial and not self.num_free_blocks:
            raise OutOfBlocks("no free block for the copy of the partial last block")
        shared = table.block_ids[:full]
        for block in shared:
            self._ref[block] += 1
        child = BlockTable(list(shared))
        copies = []
        if partial:
            dst = self._take()
            child.block_ids.append(dst)
            copies.append((table.block_ids[full], dst))
        # Chain state: inherit it when every hashed block of the parent is shared; else take the
        # hash registered for the last shared block, or start over (commit re-derives the chain).
        if table.num_hashed <= full:
            child.num_hashed, child.last_hash = table.num_hashed, table.last_hash
        elif full and shared[-1] in self._hash_of:
            child.num_hashed, child.last_hash = full, self._hash_of[shared[-1]]
        return child, copies

    # ---- hashing and release --------------------------------------------------------------
    def commit(self, table: BlockTable, token_ids: Sequence[int], num_computed: int) -> None:
        """Register hashes of blocks that are full and computed within the first num_computed tokens."""
        if not self.enable_prefix_caching:
            return
        if num_computed > min(len(token_ids), len(table.block_ids) * self.block_size):
            raise ValueError(
                f"num_computed {num_computed} exceeds the {len(token_ids)} tokens "
                f"or the {len(table.block_ids)} blocks of the table"
            )
        bs = self.block_size
        for i in range(table.num_hashed, num_computed // bs):
            h = hash_block(table.last_hash, token_ids[i * bs : (i + 1) * bs], self.hash_extra)
            block = table.block_ids[i]
            if h not in self._block_of:  # an identical block already registered keeps the entry
                if block in self._hash_of:
                    raise AssertionError(f"block {block} is already registered under another hash")
                self._block_of[h], self._hash_of[block] = block, h
            table.num_hashed, table.last_hash = i + 1, h

    def free(self, table: BlockTable) -> None:
        """Drop the table's references, tail first, so tail blocks are evicted first; clears it."""
        for block in reversed(table.block_ids):
            if self._ref[block] <= 0:
                raise AssertionError(f"block {block} freed more often than it was referenced")
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None  # most recently freed goes last
                else:
                    self._fresh.append(block)
        table.block_ids.clear()
        table.num_hashed, table.last_hash = 0, None

    def cached_hashes(self) -> list[int]:
        """Hashes of every block whose content is registered (referenced or evictable): what a
        router can expect a prompt's chain to hit here."""
        return list(self._block_of)

    def stats(self) -> CacheStats:
        free = self.num_free_blocks
        return CacheStats(
            num_blocks=self.num_blocks,
            num_free_blocks=free,
            num_cached_blocks=len(self._hash_of),
            usage=(self.num_blocks - free) / self.num_blocks,
            prefix_queries=self._queries,
            prefix_hits=self._hits,
            evictions=self._evictions,
        )
