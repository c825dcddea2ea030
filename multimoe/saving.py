"""Atomic `save_pretrained`: a save over an existing checkpoint completes, or leaves it as it was.

transformers writes into the target directory file by file, config first. An interrupted save (a
crash, a full disk, Ctrl-C) leaves a new config.json next to a mix of new and old shards, which
may load without error and serve the wrong weights. Here the save goes into a temporary sibling
directory, is flushed to disk, and is swapped into place with two renames, so the target holds
one complete checkpoint at every moment but the instant between the renames (and a failure there
puts the previous checkpoint back). Given a `verify` check, a staged save that would not load is
refused before the swap, so a loadable checkpoint is never replaced by one that does not load.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoints import CheckpointError

# Weights of any earlier save: replaced as a whole, so that no stale shard or index survives next to
# the new ones (transformers' in-place save keeps an old `model.safetensors` beside a new index).
WEIGHTS_FILE = re.compile(
    r"(pytorch_model|model|adapter_model)([.-].*)?\.(safetensors|bin)(\.index(\.[^.]+)?\.json)?"
)


def atomic_save_pretrained(
    save: Callable[..., object],
    save_directory: str | os.PathLike,
    *,
    verify: Callable[[Path], object] | None = None,
    every_rank: bool = False,
    **kwargs,
) -> None:
    """Run `save(directory, **kwargs)`, transformers' `save_pretrained`, so that `save_directory`
    ends up holding the new checkpoint or, if the save fails, the previous one, untouched.

    `every_rank`: every rank of the process group runs this save (a model split over the ranks,
    whose weights they gather together; rank 0 writes). Each rank then returns once the checkpoint
    is in place, and raises if rank 0's save failed.

    `verify(directory)` checks the staged checkpoint before it is swapped in, raising a `ValueError`
    if it would not load; the save is then refused with the reason. Files of the previous
    directory that are not weights (a tokenizer, a README) are kept unless the save rewrote them.
    Where no sibling directory can be swapped in (a mount point, the working directory or one of
    its parents, a parent that is not writable) the save runs in place, unverified, with a warning;
    on processes that do not write files (see `writes_files`) it runs in place.
    """
    if not (every_rank and saved_by_one_of_several_ranks(kwargs)):
        return save_atomically(save, save_directory, verify=verify, **kwargs)
    failure = None
    try:
        if writes_files(kwargs):
            save_atomically(save, save_directory, verify=verify, **kwargs)
        else:
            with tempfile.TemporaryDirectory() as scratch:  # transformers creates its directory on every rank
                save(scratch, **kwargs)
    except Exception as error:
        failure = error
    outcome = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    torch.distributed.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise CheckpointError(f"save_pretrained failed on rank 0, which writes the checkpoint: {outcome[0]}")


def saved_by_one_of_several_ranks(kwargs: dict) -> bool:
    """Whether this save is one process's part of a save by several (a model split over ranks), with
    rank 0 alone writing files (not a distributed DCP checkpoint, which every rank writes)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return distributed and torch.distributed.get_world_size() > 1 and not kwargs.get("distributed_checkpoint")


def save_atomically(
    save: Callable[..., object],
    save_directory: str | os.PathLike,
    *,
    verify: Callable[[Path], object] | None = None,
    **kwargs,
) -> None:
    """`atomic_save_pretrained` on one process (see there)."""
    target = Path(save_directory).resolve()
    if target.is_file():
        raise NotADirectoryError(f"save_pretrained: {os.fspath(save_directory)!r} is a file; give a directory.")
    if not writes_files(kwargs):
        save(save_directory, **kwargs)  # transformers' own behaviour: nothing to swap
        return
    if kwargs.get("push_to_hub"):
        kwargs.setdefault("repo_id", Path(os.path.abspath(save_directory)).name)  # not the staging directory's
    target.parent.mkdir(parents=True, exist_ok=True)
    reason = unswappable(target)
    staging = sibling(target, "saving")
    if reason is None:
        try:
            staging.mkdir()
        except OSError as error:
            reason = f"{target.parent} does not take a temporary directory ({error})"
    if reason is not None:
        warnings.warn(f"Saving into {target} in place, not atomically: {reason}.", stacklevel=3)
        save(save_directory, **kwargs)
        return
    try:
        save(staging, **kwargs)
        if target.is_dir():
            carry_over(target, staging)
        if verify is not None:
            check_loads(verify, staging, target)
        sync_tree(staging)
        swap(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_loads(verify: Callable[[Path], object], staging: Path, target: Path) -> None:
    """Run `verify` on the staged checkpoint; its refusal becomes the refusal of the save."""
    try:
        verify(staging)
    except ValueError as error:
        raise CheckpointError(
            f"save_pretrained refused: the checkpoint it wrote would not load, so {target} is left as it was. "
            f"{error}"
        ) from error


def writes_files(kwargs: dict) -> bool:
    """Whether this process writes the checkpoint, so that it alone may swap directories.

    A distributed (DCP) checkpoint is written by every rank, so it is saved in place.
    """
    return not kwargs.get("distributed_checkpoint") and is_main_writer(kwargs)


def is_main_writer(kwargs: dict) -> bool:
    """Whether this process writes the files one process writes, as transformers decides: the main
    process only (rank 0 when torch.distributed is initialised; the other ranks take part in
    gathering sharded weights and write nothing)."""
    if not kwargs.get("is_main_process", True):
        return False
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def unswappable(target: Path) -> str | None:
    """Why `target` cannot be renamed away, if it cannot."""
    if os.path.ismount(target):
        return "it is a mount point"
    cwd = Path.cwd()
    if cwd == target or target in cwd.parents:
        return "it holds the current working directory"
    return None


def sibling(target: Path, purpose: str) -> Path:
    """A fresh hidden name next to `target`: the same file system, so renames are atomic."""
    return target.with_name(f".{target.name}.{purpose}-{uuid.uuid4().hex[:12]}")


def carry_over(previous: Path, staging: Path) -> None:
    """Keep what the save did not write and is not weights: a tokenizer, a README, subfolders."""
    for entry in previous.iterdir():
        destination = staging / entry.name
        if os.path.lexists(destination) or WEIGHTS_FILE.fullmatch(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, destination, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(entry, destination)


def link_or_copy(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """A hard link costs neither time nor space; a file system without them gets a copy."""
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def sync_tree(root: Path) -> None:
    """Flush files and directory entries, so a power cut after the rename cannot expose empty files."""
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory, name)
            if not path.is_symlink():
                fsync(path)
        fsync(Path(directory))


def fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def swap(staging: Path, target: Path) -> None:
    """Publish `staging` as `target`; if the second rename fails, the previous checkpoint goes back."""
    if not target.exists():
        os.rename(staging, target)
    else:
        previous = sibling(target, "previous")
        os.rename(target, previous)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(previous, target)
            raise
        shutil.rmtree(previous, ignore_errors=True)
    fsync(target.parent)


__all__ = ["atomic_save_pretrained", "is_main_writer"]
