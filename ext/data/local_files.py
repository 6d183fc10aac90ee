"""Local text files as a dataset for torchtitan's built-in text loader.

Registers ``training.dataset = "local_files"``: ``training.dataset_path``
names a ``.jsonl``/``.json``/``.parquet``/``.txt`` file, or a folder of
files of one such kind, whose records carry a ``text`` field (``.txt``: one
document per line). It feeds torchtitan's concatenate-and-chunk
``build_text_dataloader`` unchanged.
"""

from __future__ import annotations

import os
from typing import Any

from datasets import Dataset, load_dataset
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS

DATASET_NAME = "local_files"

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def _data_files(path: str) -> tuple[str, list[str]]:
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(
            os.path.join(path, name)
            for name in os.listdir(path)
            if os.path.splitext(name)[1] in _BUILDERS
        )
    else:
        raise FileNotFoundError(
            f"[training] dataset_path {path!r} does not exist; point it at a data file or folder"
        )
    kinds = {_BUILDERS.get(os.path.splitext(f)[1]) for f in files}
    if not files or None in kinds or len(kinds) != 1:
        raise ValueError(
            f"[training] dataset_path {path!r} must hold files of one kind among "
            f"{sorted(_BUILDERS)}; found {[os.path.basename(f) for f in files] or 'none'}"
        )
    return kinds.pop(), files


def load_local_files(path: str) -> Dataset:
    """Load ``path`` (file or folder) as one map-style ``train`` split."""
    builder, files = _data_files(path)
    return load_dataset(builder, data_files=files, split="train")


def _text(sample: dict[str, Any]) -> str:
    return sample["text"]


def register() -> None:
    """Add ``local_files`` to torchtitan's dataset table (idempotent)."""
    DATASETS.setdefault(
        DATASET_NAME,
        DatasetConfig(path="", loader=load_local_files, sample_processor=_text),
    )
