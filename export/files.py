"""Writing files safely: never clobber one without being told, never leave a half-written one.

Every writer of the project (exports, quantized files, benchmark JSONs, model_zoo.md, plots, token pictures) goes
through ``atomic_output``: the content goes to a hidden temporary file beside the target, which is renamed onto it
only when complete, so an interrupted run (an exception, Ctrl-C) leaves the target as it was.
"""
import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ['atomic_output', 'check_out_path']


def check_out_path(out_path: str | os.PathLike, force: bool = False) -> Path:
    """Check that an output file may be written: its folder exists, and it does not exist unless ``force``.

    Args:
        out_path: The file to write.
        force: Allow overwriting an existing file.

    Returns:
        ``out_path`` as a Path.

    Raises:
        IsADirectoryError: If ``out_path`` is a folder (with or without ``force``).
        FileExistsError: If the file exists and ``force`` is False.
        FileNotFoundError: If the folder does not exist.
    """
    out_path = Path(out_path)
    if out_path.is_dir():
        raise IsADirectoryError(f"{out_path} is a folder; --out (out_path) must name the .onnx file to write")
    if out_path.exists() and not force:
        raise FileExistsError(f"{out_path} already exists; pass --force (force=True) to overwrite it")
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"output folder {out_path.parent} does not exist; create it first")
    return out_path


@contextlib.contextmanager
def atomic_output(out_path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Write a file all at once: yields a hidden temporary path beside ``out_path``, renamed onto it on success.

    On any failure (an exception, Ctrl-C) the temporary file is removed and ``out_path`` is left as it was, so an
    interrupted export or quantization never leaves a half-written or clobbered file.

    Args:
        out_path: The file to write (checked with ``check_out_path`` first).
        force: Allow replacing an existing file.

    Raises:
        FileExistsError: If ``out_path`` exists (or appeared meanwhile) and ``force`` is False.
    """
    out_path = check_out_path(out_path, force)
    # a unique hidden name beside the target: same filesystem, so the final rename is atomic (not mkstemp: its 0600
    # mode would stick to the result)
    tmp_path = out_path.with_name(f'.{out_path.name}.{uuid.uuid4().hex[:12]}.tmp')
    try:
        yield tmp_path
        if out_path.exists() and not force:  # created while we were working: still never clobber it
            raise FileExistsError(f"{out_path} appeared meanwhile; pass --force (force=True) to overwrite it")
        os.replace(tmp_path, out_path)
    finally:
        tmp_path.unlink(missing_ok=True)
