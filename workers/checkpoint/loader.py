"""Read a Hugging Face safetensors checkpoint into a model's slots.

The model lists the tensors it owns (`Slot`s); only those are read, through safetensors' lazy
per-tensor access, so a rank that owns a subset of experts never reads the rest. Sharded
checkpoints (`model.safetensors.index.json`) and single files are both accepted. Tensors the
model does not own (the MTP layers after the last decoder layer, other ranks' experts) are
skipped. A slot with an `alias` (tied embeddings) is read from the alias when its own name is
absent. A missing tensor, a wrong shape or a wrong payload dtype fails with the tensor's name.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import safe_open

from moecluster.workers.model.weights import Slot

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
PROGRESS_MIN_BYTES = 256 << 20  # show a progress bar for loads larger than this


class CheckpointError(ValueError):
    """The checkpoint does not match what the config describes; the message names the tensor."""


def checkpoint_files(model_dir: str | Path) -> dict[str, Path]:
    """Map every tensor name in the checkpoint to the safetensors file that holds it."""
    root = Path(model_dir)
    index = root / INDEX_FILE
    if index.is_file():
        try:  # ValueError covers bad JSON and bytes that are not UTF-8; the others, fields of the wrong shape
            files = {name: root / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from e
        for path in set(files.values()):
            if not path.is_file():
                raise CheckpointError(f"{index} names shard {path.name}, which does not exist")
        return files
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        others = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
        hint = f" (found {', '.join(others[:3])}: only safetensors is supported)" if others else ""
        raise CheckpointError(f"{root}: no *.safetensors files and no {INDEX_FILE}{hint}")
    files: dict[str, Path] = {}
    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                files[name] = path
    return files


def load_slots(model_dir: str | Path, slots: Iterable[Slot], progress: bool | None = None) -> None:
    """Fill every slot from the checkpoint in model_dir."""
    files = checkpoint_files(model_dir)
    by_file: dict[Path, list[tuple[Slot, str]]] = defaultdict(list)  # slot, the name it is read from
    for slot in slots:
        source = slot.name
        if source not in files and slot.alias is not None and slot.alias in files:
            source = slot.alias  # tied embeddings stored once
        if source not in files:
            also = f" (nor its alias '{slot.alias}')" if slot.alias is not None else ""
            raise CheckpointError(f"tensor '{slot.name}'{also} is missing from the checkpoint in {model_dir}")
        by_file[files[source]].append((slot, source))
    total = sum(s.target.numel() * s.target.element_size() for ss in by_file.values() for s, _ in ss
                if s.target is not None)
    show = progress if progress is not None else (total >= PROGRESS_MIN_BYTES and sys.stderr.isatty())
    with Progress(
        TextColumn("loading {task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
        disable=not show, transient=True,
    ) as bar:
        task = bar.add_task(Path(model_dir).name, total=total)
        done, reported = 0, 0  # without a terminal (a Ray actor's log): a line every 10%
        for path in sorted(by_file):
            with safe_open(str(path), framework="pt") as f:
                for slot, source in by_file[path]:
                    _fill(slot, f.get_tensor(source), path)
                    if slot.target is not None:
                        size = slot.target.numel() * slot.target.element_size()
                        bar.advance(task, size)
                        done += size
                        if not show and total >= PROGRESS_MIN_BYTES and 10 * done // total > reported:
                            reported = 10 * done // total
                            log.info("loading %s: %d%% (%.2f of %.2f GiB)", Path(model_dir).name, 10 * reported,
                                     done / 2**30, total / 2**30)
    skipped = len(set(files) - {source for ss in by_file.values() for _, source in ss})
    log.info("loaded %d tensors (%.1f MiB) from %s; %d not owned by this model skipped",
             sum(len(ss) for ss in by_file.values()), total / 2**20, model_dir, skipped)


def _fill(slot: Slot, tensor: torch.Tensor, path: Path) -> None:
    if slot.expect is not None:
        if tensor.numel() != slot.expect.numel() or not torch.equal(tensor.to(torch.int64).flatten(), slot.expect.flatten()):
            raise CheckpointError(
                f"tensor '{slot.name}' in {path.name} holds {tensor.tolist()}, expected {slot.expect.tolist()}"
            )
        return
    target = slot.target
    assert target is not None
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(
            f"tensor '{slot.name}' in {path.name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
        )
    if slot.keep_dtype and tensor.dtype != target.dtype:
        raise CheckpointError(
            f"tensor '{slot.name}' in {path.name} has dtype {tensor.dtype}, expected {target.dtype} "
            "(as the checkpoint's quantization_config describes it)"
        )
    if not slot.keep_dtype and (not tensor.is_floating_point() or tensor.element_size() == 1):
        raise CheckpointError(
            f"tensor '{slot.name}' in {path.name} has dtype {tensor.dtype}, expected a 16- or 32-bit float "
            "(a quantized tensor where config.json declares no quantization for it?)"
        )
    with torch.no_grad():
        target.copy_(tensor)
