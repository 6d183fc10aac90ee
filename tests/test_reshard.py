"""ext.data.reshard writes contiguous, balanced parquet shards and refuses bad requests cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from datasets import Dataset, load_dataset

from ext.data.reshard import ReshardError, main, reshard, shard_bounds

from .conftest import REPO


def _records(n: int) -> list[dict]:
    return [{"text": f"document number {i}", "id": i, "score": i / 4} for i in range(n)]


def _write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _read_back(paths: list[str]) -> list[dict]:
    """Every record of the shards, in shard order, read with `datasets` (parquet builder)."""
    return load_dataset("parquet", data_files=paths, split="train").to_list()


def _sizes(paths: list[str]) -> list[int]:
    return [pq.ParquetFile(p).metadata.num_rows for p in paths]


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_shard_bounds_are_contiguous_and_balanced():
    for n in range(1, 40):
        for k in range(1, n + 1):
            bounds = shard_bounds(n, k)
            assert len(bounds) == k and bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [e - s for s, e in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_jsonl_shards_are_balanced_and_reproduce_every_record_in_order(tmp_path):
    records = _records(103)
    src = _write_jsonl(tmp_path / "web.jsonl", records)
    out = tmp_path / "out"
    paths = reshard(src, 8, str(out), progress=False)

    assert [os.path.basename(p) for p in paths] == [f"part-{i:05d}-of-00008.parquet" for i in range(8)]
    assert sorted(os.listdir(out)) == [os.path.basename(p) for p in paths]  # nothing else left there
    sizes = _sizes(paths)
    assert sum(sizes) == 103 and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger shards come first
    assert _read_back(paths) == records  # all columns, source order, across shards
    # shard i holds exactly the records [start_i, end_i)
    start = 0
    for path, size in zip(paths, sizes):
        assert [r["id"] for r in pq.read_table(path).to_pylist()] == list(range(start, start + size))
        start += size
    # no temporary sibling folders survive
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "web.jsonl"]


def test_row_groups_are_at_most_ten_thousand_rows(tmp_path):
    src = _write_jsonl(tmp_path / "big.jsonl", [{"text": "x"}] * 25_001)
    paths = reshard(src, 1, str(tmp_path / "out"), progress=False)
    meta = pq.ParquetFile(paths[0]).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [10_000, 10_000, 5_001]


def test_txt_input_stores_one_document_per_line_as_text(tmp_path):
    lines = [f"line {i} of the book" for i in range(10)]
    (tmp_path / "book.txt").write_text("\n".join(lines) + "\n")
    paths = reshard(str(tmp_path / "book.txt"), 3, str(tmp_path / "out"), progress=False)
    assert _sizes(paths) == [4, 3, 3]
    assert _read_back(paths) == [{"text": line} for line in lines]


def test_parquet_input_keeps_columns_and_types(tmp_path):
    records = _records(20)
    Dataset.from_list(records).to_parquet(str(tmp_path / "src.parquet"))
    paths = reshard(str(tmp_path / "src.parquet"), 6, str(tmp_path / "out"), progress=False)
    assert _sizes(paths) == [4, 4, 3, 3, 3, 3]
    back = load_dataset("parquet", data_files=paths, split="train")
    assert back.column_names == ["text", "id", "score"]
    assert back.to_list() == records


def test_folder_input_reads_its_files_in_sorted_order(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    records = _records(30)
    # written out of name order on purpose; the folder is read sorted by name
    _write_jsonl(src / "b.jsonl", records[10:25])
    _write_jsonl(src / "c.jsonl", records[25:])
    _write_jsonl(src / "a.jsonl", records[:10])
    (src / "README.md").write_text("not data")  # other kinds of file are ignored
    paths = reshard(str(src), 4, str(tmp_path / "out"), progress=False)
    assert _sizes(paths) == [8, 8, 7, 7]
    assert _read_back(paths) == records


def test_arrow_folder_written_by_save_to_disk(tmp_path):
    records = _records(9)
    Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    paths = reshard(str(tmp_path / "saved"), 3, str(tmp_path / "out"), progress=False)
    assert _read_back(paths) == records


def test_folder_mixing_kinds_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("x\n")
    _write_jsonl(src / "b.jsonl", [{"text": "y"}])
    with pytest.raises(ReshardError, match="mixes data file kinds"):
        reshard(str(src), 1, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_non_empty_output_is_refused_and_left_untouched(tmp_path):
    src = _write_jsonl(tmp_path / "web.jsonl", _records(5))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = _snapshot(out)
    with pytest.raises(ReshardError, match=r"not empty.*--overwrite"):
        reshard(src, 2, str(out), progress=False)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "web.jsonl"]


def test_overwrite_replaces_the_old_output_completely(tmp_path):
    src = _write_jsonl(tmp_path / "web.jsonl", _records(12))
    out = tmp_path / "out"
    reshard(src, 4, str(out), progress=False)
    (out / "stale.txt").write_text("old")
    paths = reshard(src, 3, str(out), overwrite=True, progress=False)
    assert sorted(os.listdir(out)) == [f"part-{i:05d}-of-00003.parquet" for i in range(3)]
    assert _read_back(paths) == _records(12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "web.jsonl"]


def test_empty_output_folder_is_used(tmp_path):
    src = _write_jsonl(tmp_path / "web.jsonl", _records(4))
    (tmp_path / "out").mkdir()
    assert len(reshard(src, 2, str(tmp_path / "out"), progress=False)) == 2


def test_overwrite_never_replaces_the_source_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write_jsonl(src / "a.jsonl", _records(4))
    with pytest.raises(ReshardError, match="holds the source"):
        reshard(str(src), 2, str(src), overwrite=True, progress=False)
    assert os.listdir(src) == ["a.jsonl"]


def test_missing_text_field_names_the_field_and_the_columns(tmp_path):
    src = _write_jsonl(tmp_path / "web.jsonl", [{"content": "a", "id": 1}, {"content": "b", "id": 2}])
    with pytest.raises(ReshardError) as err:
        reshard(src, 1, str(tmp_path / "out"), progress=False)
    msg = str(err.value)
    assert "'text'" in msg and "'content'" in msg and "'id'" in msg and "--text-field" in msg
    # ... and naming the right field works
    paths = reshard(src, 1, str(tmp_path / "out"), text_field="content", progress=False)
    assert _read_back(paths) == [{"content": "a", "id": 1}, {"content": "b", "id": 2}]


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.txt"])
def test_empty_source_is_refused(tmp_path, name):
    (tmp_path / name).write_text("")
    with pytest.raises(ReshardError, match="no records"):
        reshard(str(tmp_path / name), 1, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_empty_parquet_source_is_refused(tmp_path):
    Dataset.from_dict({"text": []}).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(ReshardError, match="no records"):
        reshard(str(tmp_path / "empty.parquet"), 1, str(tmp_path / "out"), progress=False)


def test_bad_shard_counts_and_missing_source_are_refused(tmp_path):
    src = _write_jsonl(tmp_path / "web.jsonl", _records(3))
    with pytest.raises(ReshardError, match=">= 1"):
        reshard(src, 0, str(tmp_path / "out"), progress=False)
    with pytest.raises(ReshardError, match="more than the 3 record"):
        reshard(src, 4, str(tmp_path / "out"), progress=False)
    with pytest.raises(ReshardError, match="does not exist"):
        reshard(str(tmp_path / "nope.jsonl"), 2, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_main_prints_one_error_line_and_exits_2(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "web.jsonl", _records(3))
    cases = [
        [str(tmp_path / "nope.jsonl"), "--num-shards", "2", "--out", str(tmp_path / "o1")],
        [src, "--num-shards", "0", "--out", str(tmp_path / "o2")],
        [src, "--num-shards", "2", "--out", str(tmp_path / "o3"), "--text-field", "body"],
    ]
    for argv in cases:
        assert main([*argv, "--no-progress"]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert main([src, "--num-shards", "2", "--out", str(busy), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert main([src, "--num-shards", "2", "--out", str(busy), "--overwrite", "--no-progress"]) == 0
    assert sorted(os.listdir(busy)) == ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]


def test_cli_subprocess_writes_shards_with_progress_on_stderr(tmp_path):
    records = _records(50)
    src = _write_jsonl(tmp_path / "web.jsonl", records)
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ext.data.reshard", src, "--num-shards", "4", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resharding" in proc.stderr and "50/50" in proc.stderr  # the tqdm bar, finished
    assert "resharding" not in proc.stdout and "%|" not in proc.stdout
    assert "wrote 4 shards" in proc.stdout
    paths = sorted(str(p) for p in out.iterdir())
    assert _sizes(paths) == [13, 13, 12, 12]
    assert _read_back(paths) == records

    # refusals from the real CLI: exit 2 with an "error:" line, output untouched
    before = _snapshot(out)
    proc = subprocess.run(
        [sys.executable, "-m", "ext.data.reshard", src, "--num-shards", "4", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert _snapshot(out) == before


def test_empty_arrow_source_is_refused(tmp_path):
    Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ReshardError, match="no records"):
        reshard(str(tmp_path / "saved"), 1, str(tmp_path / "out"), progress=False)


# ---------------------------------------------------------------- shared with the loader


def test_local_data_files_kinds_and_ignored_names(tmp_path):
    from ext.data.config import local_data_files

    src = tmp_path / "src"
    src.mkdir()
    _write_jsonl(src / "b.jsonl", _records(2))
    _write_jsonl(src / "a.jsonl", _records(2))
    for name in (".hidden.txt", "_meta.txt", "README.md"):
        (src / name).write_text("x\n")
    assert local_data_files(str(src)) == ("jsonl", (str(src / "a.jsonl"), str(src / "b.jsonl")))
    (src / "c.json").write_text(json.dumps(_records(1)))
    kind, files = local_data_files(str(src))  # .jsonl beside .json: all read by the json builder
    assert kind == "json" and len(files) == 3
    assert local_data_files(str(src), "jsonl")[1] == (str(src / "a.jsonl"), str(src / "b.jsonl"))
    (tmp_path / "notes.log").write_text("x\n")
    assert local_data_files(str(tmp_path / "notes.log"), "txt") == ("txt", (str(tmp_path / "notes.log"),))

    Dataset.from_list(_records(3)).save_to_disk(str(tmp_path / "saved"))
    kind, files = local_data_files(str(tmp_path / "saved"))
    assert kind == "arrow" and files and all(f.endswith(".arrow") for f in files)


def test_local_data_files_errors_are_one_line_without_a_config_key(tmp_path):
    from ext.data.config import local_data_files
    from ext.core.errors import ConfigError

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write_jsonl(mixed / "a.jsonl", _records(1))
    _write_jsonl(mixed / "b.jsonl", _records(1))
    (mixed / "c.txt").write_text("x\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("x")
    (tmp_path / "data.csv").write_text("a,b\n")
    cases = {
        str(mixed): rf"^folder '{mixed}' mixes data file kinds \(2 \.jsonl, 1 \.txt\); keep one kind per folder$",
        str(empty): r"^folder .* holds no data files",
        str(tmp_path / "data.csv"): r"^cannot tell the kind of .* extension '\.csv'",
    }
    for location, pattern in cases.items():
        with pytest.raises(ConfigError, match=pattern) as err:
            local_data_files(location)
        assert "\n" not in str(err.value) and "[data]" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown format 'csv'"):
        local_data_files(str(mixed), "csv")


def test_loader_and_reshard_report_the_same_problem(tmp_path):
    from ext.data.config import Data, resolve_sources
    from ext.core.errors import ConfigError

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("x\n")
    _write_jsonl(src / "b.jsonl", [{"text": "y"}])
    with pytest.raises(ConfigError, match=r"^\[data\] datasets\[0\] folder .* mixes data file kinds"):
        resolve_sources(Data(datasets=[str(src)]))
    with pytest.raises(ReshardError, match=r"^folder .* mixes data file kinds .*; or pick one with --format$"):
        reshard(str(src), 1, str(tmp_path / "out"), progress=False)
    # a folder no --format can help gets no --format hint
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("x")
    with pytest.raises(ReshardError, match="no data files") as err:
        reshard(str(tmp_path / "docs"), 1, str(tmp_path / "out"), progress=False)
    assert "--format" not in str(err.value)


def test_loader_reads_a_save_to_disk_folder_as_arrow(tmp_path):
    from ext.data.config import Data, resolve_sources

    Dataset.from_list(_records(4)).save_to_disk(str(tmp_path / "saved"))
    (spec,) = resolve_sources(Data(datasets=[str(tmp_path / "saved")]))
    assert spec.kind == "arrow" and all(f.endswith(".arrow") for f in spec.files)


def test_hub_id_detection(tmp_path):
    from ext.data.config import Data, looks_like_hub_id, resolve_sources

    for ok in ("allenai/c4", "c4", "HuggingFaceFW/fineweb-edu", "org/name.v1"):
        assert looks_like_hub_id(ok), ok
    for bad in ("data/web.jsonl", "./data", "/abs/path", "~/x", "a/b/c", "org/", "nope.parquet", ""):
        assert not looks_like_hub_id(bad), bad
    (spec,) = resolve_sources(Data(datasets=["allenai/c4"]))
    assert (spec.kind, spec.name, spec.files) == ("hub", "c4", ())
