"""Rewrite one data source into N parquet shards.

The loader no longer needs this for balance: every source is cut into
ranges by size (bytes, lines or rows; :mod:`ext.data.sources`), whatever its
file count. Resharding still helps to turn a source into parquet (row groups
read column by column, no JSON parsing) or to split compressed files, whose
lines are counted once per file before training (a decompression pass).

Usage::

    # a jsonl file -> 32 parquet shards (any count works for the loader)
    python -m ext.data.reshard data/web.jsonl --num-shards 32 --out data/web-32
    python -m ext.cli reshard data/web.jsonl --num-shards 32 --out data/web-32   # the same, beside the other tools
    python -m ext.data.reshard data/books/ --num-shards 64 --out data/books-64 --format txt
    python -m ext.data.reshard allenai/c4 --split validation --num-shards 32 --out data/c4-val

SOURCE is a local file, a folder of files of one kind (``.jsonl``/``.json``,
``.parquet``, ``.arrow``, ``.txt`` -- one document per line, stored as
column ``text``), or a Hugging Face Hub dataset id (needs network). The
output is ``DIR/part-00000-of-000NN.parquet`` ...: shard ``i`` holds the
contiguous records ``[start_i, end_i)``, sizes differ by at most one, and
reading the shards in name order gives back every record, every column, in
the source order. The folder is written next to DIR under a temporary name
and renamed into place only once complete, so DIR never holds a partial
result (with ``--overwrite`` the old DIR is replaced only at that point).

Refused with exit status 2 and one ``error:`` line: an existing non-empty
DIR without ``--overwrite``; ``--num-shards`` below 1 or above the record
count (a reader with an empty shard would starve); a missing SOURCE; a
source without the ``--text-field`` column; an empty source.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator, Sequence

from ext.data.config import local_data_files, looks_like_hub_id
from ext.core.errors import ConfigError

__all__ = ["ReshardError", "reshard", "shard_bounds", "main"]

ROWS_PER_GROUP = 10_000

# data kind (= --format value) -> `datasets` builder name
_BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "arrow": "arrow", "txt": "text"}


class ReshardError(ValueError):
    """A refused request; the message is one line naming the problem and the fix."""


def shard_bounds(num_records: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` ranges over ``num_records``, sizes differing by at most one."""
    base, extra = divmod(num_records, num_shards)
    bounds, start = [], 0
    for i in range(num_shards):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def shard_name(index: int, num_shards: int) -> str:
    return f"part-{index:05d}-of-{num_shards:05d}.parquet"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------- source


def _check_format(fmt: str) -> None:
    if fmt != "auto" and fmt not in _BUILDERS:
        raise ReshardError(f"unknown --format {fmt!r}; use one of auto, {', '.join(_BUILDERS)}")


def _local_files(path: str, fmt: str) -> tuple[str, list[str]]:
    """(builder, sorted data files) for a local file or folder."""
    _check_format(fmt)
    # --format jsonl and json both mean the `datasets` json builder, which reads .jsonl and .json
    try:
        kind, files = local_data_files(path, "json" if fmt == "jsonl" else fmt)
    except ConfigError as exc:
        hint = "; or pick one with --format" if fmt == "auto" and _format_would_help(path) else ""
        raise ReshardError(f"{exc}{hint}") from None
    return _BUILDERS[kind], list(files)


def _format_would_help(path: str) -> bool:
    """Whether some --format would make ``path`` readable (worth saying in the error)."""
    for kind in _BUILDERS:
        try:
            local_data_files(path, kind)
        except ConfigError:
            continue
        return True
    return False


def _hub_offline() -> bool:
    import datasets.config

    return bool(datasets.config.HF_HUB_OFFLINE or getattr(datasets.config, "HF_DATASETS_OFFLINE", False))


def _load(source: str, split: str, fmt: str):
    from datasets import load_dataset

    if os.path.exists(source):
        builder, files = _local_files(source, fmt)
        if all(os.path.getsize(f) == 0 for f in files):
            raise _empty(source)
        try:
            # keyed by `split` so any split name works for local files
            return load_dataset(builder, data_files={split: files}, split=split)
        except Exception as exc:
            if _has_no_records(builder, files):
                raise _empty(source) from exc
            raise ReshardError(
                f"could not read {source!r} as {builder} files ({_one_line(exc)}); "
                f"check the files or pass the right --format"
            ) from exc

    if not looks_like_hub_id(source):
        raise ReshardError(f"SOURCE {source!r} does not exist; point it at a data file or folder")
    if _hub_offline():
        raise ReshardError(
            f"SOURCE {source!r} is not a local file or folder, and Hub access is off "
            f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); fix the path or go online"
        )
    try:
        return load_dataset(source, split=split)
    except Exception as exc:
        raise ReshardError(
            f"SOURCE {source!r} is not a local file or folder, and loading it as a Hugging Face Hub "
            f"dataset (split {split!r}) failed ({_one_line(exc)}); fix the path, dataset id or --split"
        ) from exc


def _blank(path: str) -> bool:
    """Whether a text file holds nothing but whitespace (stops at the first other byte)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.strip():
                return False
    return True


def _has_no_records(builder: str, files: list[str]) -> bool:
    """Whether ``files`` hold no records at all (asked only once loading has failed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if builder in ("json", "text"):
            return all(_blank(f) for f in files)
        if builder == "parquet":
            return sum(pq.ParquetFile(f).metadata.num_rows for f in files) == 0
        if builder == "arrow":
            total = 0
            for f in files:
                with pa.memory_map(f) as source:
                    try:
                        reader = pa.ipc.open_stream(source)
                    except pa.ArrowInvalid:
                        source.seek(0)
                        reader = pa.ipc.open_file(source)
                    total += reader.read_all().num_rows
            return total == 0
    except Exception:
        return False
    return False


def _empty(source: str) -> ReshardError:
    return ReshardError(f"source {source!r} has no records; point SOURCE at non-empty data")


# --------------------------------------------------------------------------- output


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ReshardError(f"--out {out!r} exists and is not a folder; pick a folder path")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ReshardError(f"--out {out!r} exists and is not empty; pick a new folder or pass --overwrite")


def _check_not_replacing_source(source: str, out: str) -> None:
    if not (os.path.exists(source) and os.path.isdir(out)):
        return
    src, dst = os.path.realpath(source), os.path.realpath(out)
    if src == dst or src.startswith(dst.rstrip(os.sep) + os.sep):
        raise ReshardError(f"--out {out!r} holds the source {source!r}; write the shards to another folder")


@contextmanager
def _quiet_datasets(quiet: bool) -> Iterator[None]:
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    if quiet and not was_disabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if quiet and not was_disabled:
            datasets.enable_progress_bars()


def _write_shards(ds, folder: str, num_shards: int, progress: bool) -> list[str]:
    import pyarrow.parquet as pq
    from tqdm import tqdm

    schema = ds.features.arrow_schema  # keeps the `datasets` feature metadata
    table_view = ds.with_format("arrow")
    names = []
    with tqdm(
        total=len(ds), unit="rec", desc="resharding",
        file=sys.stderr, disable=not progress, dynamic_ncols=True,
    ) as bar:
        for index, (start, end) in enumerate(shard_bounds(len(ds), num_shards)):
            name = shard_name(index, num_shards)
            with pq.ParquetWriter(os.path.join(folder, name), schema) as writer:
                for lo in range(start, end, ROWS_PER_GROUP):
                    table = table_view[lo:min(lo + ROWS_PER_GROUP, end)]
                    if not table.schema.equals(schema, check_metadata=False):
                        table = table.cast(schema)
                    writer.write_table(table, row_group_size=ROWS_PER_GROUP)
                    bar.update(table.num_rows)
            names.append(name)
    written = sum(pq.ParquetFile(os.path.join(folder, n)).metadata.num_rows for n in names)
    if written != len(ds):  # cheap guard before anything is renamed into place
        raise ReshardError(f"wrote {written} of {len(ds)} records; nothing was replaced, run again")
    return names


def _move_into_place(tmp: str, out: str) -> None:
    if not os.path.isdir(out):
        os.rename(tmp, out)
        return
    if not os.listdir(out):
        os.rmdir(out)
        os.rename(tmp, out)
        return
    parent, base = os.path.split(out)
    trash = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
    old = os.path.join(trash, base)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # put the old output back
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- API


def reshard(
    source: str,
    num_shards: int,
    out: str,
    *,
    text_field: str = "text",
    split: str = "train",
    fmt: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> list[str]:
    """Write ``source`` as ``num_shards`` contiguous parquet shards under ``out``.

    Returns the shard paths in record order. Raises :class:`ReshardError` for a
    refused request; ``out`` is then left as it was.
    """
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ReshardError(f"--num-shards must be a whole number >= 1, got {num_shards!r}; pass e.g. dp x workers")
    out = os.path.normpath(out)
    _check_out(out, overwrite)
    _check_not_replacing_source(source, out)
    _check_format(fmt)  # reject a bad --format before any loading

    with _quiet_datasets(not progress):
        ds = _load(source, split, fmt)
    if len(ds) == 0:
        raise _empty(source)
    if text_field not in ds.column_names:
        raise ReshardError(
            f"text field {text_field!r} is missing from the records of {source!r}; "
            f"columns found: {ds.column_names}; pass --text-field with one of them"
        )
    if num_shards > len(ds):
        raise ReshardError(
            f"--num-shards {num_shards} is more than the {len(ds)} record(s) of {source!r} "
            f"(some shards would be empty); pass --num-shards <= {len(ds)}"
        )

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would become DIR's mode: make it a plain mkdir's
    try:
        names = _write_shards(ds, tmp, num_shards, progress)
        _check_out(out, overwrite)  # it may have changed while we wrote
        _move_into_place(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return [os.path.join(out, n) for n in names]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ext.data.reshard",
        description="Rewrite one data source into N contiguous parquet shards "
        "(any count: the loader splits by size).",
    )
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``reshard`` (also ``python -m ext.cli reshard``)."""
    p.add_argument("source", metavar="SOURCE", help="local file or folder (jsonl/json/parquet/arrow/txt), or a Hub dataset id")
    p.add_argument("--num-shards", type=int, required=True, metavar="N", help="number of shards to write")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must be absent or empty unless --overwrite)")
    p.add_argument("--text-field", default="text", help="column that must be present (default: text)")
    p.add_argument("--split", default="train", help="split to read (default: train)")
    p.add_argument("--format", dest="fmt", default="auto", choices=["auto", *_BUILDERS], help="input format (default: from file extensions)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR once the new shards are complete")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def main(argv: Sequence[str] | None = None) -> int:
    return run(_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Reshard as ``args`` say; 0, or 2 with one ``error:`` line."""
    try:
        paths = reshard(
            args.source, args.num_shards, args.out, text_field=args.text_field,
            split=args.split, fmt=args.fmt, overwrite=args.overwrite, progress=args.progress,
        )
    except ReshardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
