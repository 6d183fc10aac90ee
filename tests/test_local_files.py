"""The local_files dataset loads real files with `datasets` and rejects bad paths clearly."""

from __future__ import annotations

import json

import pytest

from ext.data.local_files import load_local_files

from .conftest import WEB_CORPUS


def test_jsonl_file_loads_every_record():
    ds = load_local_files(str(WEB_CORPUS))
    with open(WEB_CORPUS) as f:
        assert len(ds) == sum(1 for _ in f)
    assert isinstance(ds[0]["text"], str) and ds[0]["text"]


def test_folder_of_text_files_loads_one_document_per_line(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nsecond doc\n")
    (tmp_path / "b.txt").write_text("third doc\n")
    assert [r["text"] for r in load_local_files(str(tmp_path))] == ["first doc", "second doc", "third doc"]


def test_missing_path_names_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\[training\] dataset_path"):
        load_local_files(str(tmp_path / "nope.jsonl"))


def test_folder_mixing_formats_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "y"}) + "\n")
    with pytest.raises(ValueError, match="one kind"):
        load_local_files(str(tmp_path))
