"""Output folders and safe writes, shared by `convert`, finetune and the bench: a non-empty
output is refused unless overwriting, whole folders are published by renaming, text files are
replaced atomically, and a full disk or read-only folder is one clear error line. Also the
provenance record (`relattn_provenance.json`) that `push` reads."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .version import __version__

PROVENANCE_FILE = "relattn_provenance.json"  # how a folder was made; plain transformers ignores it
# Files that show a folder holds an output of ours (a model, a finetune run, a bench): only such a
# folder is cleared by --overwrite, so a mistyped path never empties a folder of something else.
OUTPUT_MARKERS = ("config.json", "adapter_config.json", "training_args.json", "metrics.jsonl", "results.json", PROVENANCE_FILE)


class OutputError(ValueError):
    """An output folder that must not or cannot be written; the message names it and the reason."""


# How torch's zip writer (torch.save, accelerate's save_state) reports a failed write: "PytorchStreamWriter
# failed writing file ...: file write failed", or "[enforce fail at inline_container.cc] unexpected pos"
TORCH_WRITER_ERRORS = ("PytorchStreamWriter", "inline_container.cc", "file write failed")


@contextlib.contextmanager
def reporting_write_errors(what: str, folder: str | os.PathLike[str]) -> Iterator[None]:
    """Turn what a full disk or a read-only folder raises inside the block into one OutputError
    line: OSError from Python, SafetensorError from safetensors, and torch's C++ writer's
    RuntimeError (its zip writer, inline_container.cc); any other error passes unchanged."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as err:
        raise write_failure(what, folder, err) from err
    except RuntimeError as err:
        if not any(mark in str(err) for mark in TORCH_WRITER_ERRORS):
            raise
        raise write_failure(what, folder, err) from err


def write_failure(what: str, folder: str | os.PathLike[str], err: BaseException) -> OutputError:
    """One clear line for a failed save, instead of a C++ or Rust error text."""
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror + (f": {err.filename}" if err.filename else "")
    else:
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)[:200]
    return OutputError(f"Cannot write {what} to {folder}: {reason} (is the disk full or the folder read-only?)")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(folder: str | os.PathLike[str], overwrite: bool, flag: str,
                        inputs: Sequence[str | os.PathLike[str] | None] = ()) -> None:
    """Refuse a non-empty output folder unless `overwrite`, and check it can be written. Modifies nothing.

    With `overwrite`, the folder must look like an output of ours (OUTPUT_MARKERS) and must not hold
    the current directory or one of `inputs` (the model or data the run reads), since it is cleared."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{flag} {folder} is a file, not a folder: choose a folder path")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise OutputError(f"{flag} {folder} is not empty: pass --overwrite to replace its contents, or choose a new folder")
        if not any((folder / name).exists() for name in OUTPUT_MARKERS):
            raise OutputError(f"--overwrite: {folder} holds no model or bench output (none of {', '.join(OUTPUT_MARKERS)}), "
                              "so it is not cleared; empty it yourself or choose a new folder")
        resolved = folder.resolve()
        for path in [Path.cwd(), *(Path(p) for p in inputs if p)]:
            if path.exists() and path.resolve().is_relative_to(resolved):
                raise OutputError(f"--overwrite would delete {path}, which is inside {flag} {folder}: choose another output folder")
    check_writable(folder, flag)


def check_writable(folder: str | os.PathLike[str], flag: str) -> None:
    """Create and remove a file where `folder` will be written (it, or its nearest existing parent)."""
    where = _nearest_existing(Path(folder))
    try:
        fd, probe = tempfile.mkstemp(prefix=".relattn-write-test-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"{flag} {folder} cannot be written: {err.strerror or err} in {where}") from None


def _move_aside(path: Path) -> Path:
    """Rename `path` to a hidden sibling (one atomic step) and return the new name."""
    aside = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(path, aside)
    return aside


def clear_folder(folder: str | os.PathLike[str]) -> None:
    """Remove the folder's previous contents: renamed away first, so no half-deleted model is ever
    visible under the folder's name, then deleted; the folder is left empty."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(_move_aside(folder), ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)


def staging_folder(folder: str | os.PathLike[str]) -> Path:
    """A new hidden folder beside `folder` (the same file system, so publishing it is a rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("partial", "old"):  # left by a killed save
        for left in folder.parent.glob(f".{glob.escape(folder.name)}.{kind}-*"):
            shutil.rmtree(left, ignore_errors=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    umask = os.umask(0)  # mkdtemp makes it private (0700); the published folder gets the usual mode
    os.umask(umask)
    staged.chmod(0o777 & ~umask)
    return staged


def publish_folder(staged: Path, folder: str | os.PathLike[str]) -> None:
    """Put a completely written `staged` folder in place of `folder`: a kill at any moment leaves the
    old folder, no folder, or the new one (plus hidden leftovers), never a mix."""
    folder = Path(folder)
    old = _move_aside(folder) if folder.exists() else None
    os.replace(staged, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: a kill leaves the
    old content or the new one, never a truncated file."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temp, "x", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_provenance(folder: str | os.PathLike[str], base_model: str, variant: str | None, options: dict[str, Any],
                     layers: Sequence[int] | None, tool: str) -> None:
    """PROVENANCE_FILE: what `folder` was converted from and how, for `push`'s card (a native GQA
    checkpoint has no other record of it)."""
    record = {"format": 1, "base_model": base_model, "variant": variant or None, "variant_options": options,
              "layers": list(layers) if layers is not None else None, "tool": tool, "hf_relattn_version": __version__}
    write_text_atomic(Path(folder) / PROVENANCE_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
