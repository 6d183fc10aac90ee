"""The [input_pipeline] prefetch: the prefetcher on real torchtitan loaders, and
real CPU training runs with it on and off (same losses, exact resume)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.config import ConfigManager

import ext.job_config  # noqa: F401
from ext.data.stats import BatchStats
from ext.training.trainer import DevicePrefetcher

from .conftest import DEBUG_CONFIG, read_summary, run_train

ROW = 8


class NumberedRows(IterableDataset, Stateful):
    """Row i: input all i, labels i*ROW + 0..ROW-1 with every third one ignored."""

    def __init__(self, n_rows: int):
        self.n_rows, self.next_row = n_rows, 0

    def __iter__(self):
        while self.next_row < self.n_rows:
            i = self.next_row
            self.next_row += 1  # advance before yielding: the state then names the next row
            labels = torch.arange(i * ROW, (i + 1) * ROW)
            labels[i % 3::3] = -100
            yield {"input": torch.full((ROW,), i)}, labels

    def state_dict(self):
        return {"next_row": self.next_row}

    def load_state_dict(self, state):
        self.next_row = state["next_row"]


def loader(n_rows: int = 20) -> ParallelAwareDataloader:
    return ParallelAwareDataloader(NumberedRows(n_rows), dp_rank=0, dp_world_size=1, batch_size=2)


def test_prefetcher_hands_out_the_loader_batches_in_order_with_host_token_counts():
    direct = list(loader())
    staged = list(DevicePrefetcher(loader(), torch.device("cpu")))
    assert len(staged) == len(direct) == 10
    for (inputs, labels), batch in zip(direct, staged):
        assert torch.equal(batch.inputs["input"], inputs["input"])
        assert torch.equal(batch.labels, labels)
        assert batch.valid_tokens == int((labels != -100).sum())


def test_prefetcher_reads_one_batch_ahead_and_a_checkpoint_holds_the_state_before_it():
    data = loader()
    prefetcher = DevicePrefetcher(data, torch.device("cpu"), snapshot_state=data.state_dict)
    assert prefetcher.pending_loader_state is None  # nothing read yet
    handed = [next(prefetcher) for _ in range(4)]
    assert data.dataset.next_row == 10  # 4 batches handed out, the 5th read: rows 0..9
    resumed = loader()
    resumed.load_state_dict(prefetcher.pending_loader_state)
    inputs, _ = next(iter(resumed))
    assert inputs["input"][:, 0].tolist() == [8, 9]  # the batch read ahead is trained after resume
    assert handed[-1].inputs["input"][:, 0].tolist() == [6, 7]


def test_prefetcher_stops_when_the_loader_is_spent_and_then_holds_nothing():
    prefetcher = DevicePrefetcher(loader(n_rows=5), torch.device("cpu"), snapshot_state=lambda: "s")
    assert [b.inputs["input"][:, 0].tolist() for b in prefetcher] == [[0, 1], [2, 3], [4]]
    assert prefetcher.pending_loader_state is None
    with pytest.raises(StopIteration):
        next(prefetcher)


def test_loader_statistics_of_the_batch_read_ahead_come_with_that_batch_when_it_is_handed_out():
    read = []

    def batches():  # what PackedDataLoader.batches_with_stats yields
        for i in range(3):
            read.append(i)
            stats = BatchStats(rows=1, row_tokens=64, pad_tokens=i, docs=1.0, window_sum=10 * (i + 1),
                               max_window=10 * (i + 1), source_tokens={"only": 64 - i}, bad_records={"only": 0})
            yield {"input": torch.full((1, 4), i)}, torch.zeros(1, 4), stats

    prefetcher = DevicePrefetcher(batches(), torch.device("cpu"))
    handed = [next(prefetcher)]  # batch 0 handed out, batch 1 read
    assert read == [0, 1]
    handed += [next(prefetcher), next(prefetcher)]
    for i, batch in enumerate(handed):
        assert batch.inputs["input"][0, 0] == i
        assert batch.stats.pad_tokens == i and batch.stats.max_window == 10 * (i + 1)
    window = handed[1].stats + handed[2].stats  # what the metrics processor sums per log
    assert (window.pad_tokens, window.row_tokens, window.max_window) == (3, 128, 30)
    assert window.source_tokens == {"only": 125}
    # a loader without statistics: the batches come alone
    assert [b.stats for b in DevicePrefetcher(loader(4), torch.device("cpu"))] == [None, None]


def test_prefetch_is_a_config_switch_that_defaults_to_on():
    cfg = ConfigManager().parse_args(["--job.config_file", str(DEBUG_CONFIG)])
    assert cfg.input_pipeline.prefetch is True
    cfg = ConfigManager().parse_args(["--job.config_file", str(DEBUG_CONFIG), "--input_pipeline.no-prefetch"])
    assert cfg.input_pipeline.prefetch is False


# -- real training runs ------------------------------------------------------------------

DDP = ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "1"]
# 2 DDP ranks x 2 rows x 2 microbatches; SkyLadder grows the window every step, so the
# logged data metrics move with every batch and a batch counted at the wrong step shows.
RUN = [
    "--job.config_file", str(DEBUG_CONFIG), "--model.flavor", "nano", "--training.steps", "6",
    "--training.seq_len", "64", "--training.local_batch_size", "2", "--training.global_batch_size", "8",
    "--metrics.log_freq", "1", "--data.num_workers", "1", "--data.buffer_docs", "64",
    "--skyladder.enable", "--skyladder.init_window", "8", "--skyladder.rate", "1", *DDP,
]


def untimed(history: list[dict]) -> list[dict]:
    """Logged entries without the figures that depend on wall time (tokens/s, TFLOP/s, MFU)."""
    timed = ("tps", "tflops", "mfu", "time", "seconds")
    return [{k: v for k, v in h.items() if not any(t in k for t in timed)} for h in history]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Without prefetch; with prefetch and a checkpoint at step 3; resumed from it."""
    root = tmp_path_factory.mktemp("prefetch_runs")
    run_train([*RUN, "--input_pipeline.no-prefetch", "--job.dump_folder", str(root / "off")], nproc=2)
    on = run_train([*RUN, "--checkpoint.enable", "--checkpoint.interval", "3",
                    "--job.dump_folder", str(root / "on")], nproc=2)
    (root / "resumed" / "checkpoint").mkdir(parents=True)
    shutil.copytree(root / "on" / "checkpoint" / "step-3", root / "resumed" / "checkpoint" / "step-3")
    run_train([*RUN, "--checkpoint.enable", "--checkpoint.interval", "3",
               "--job.dump_folder", str(root / "resumed")], nproc=2)
    return {name: untimed(read_summary(root / name)["history"]) for name in ("off", "on", "resumed")}, on.output


@pytest.mark.slow
def test_prefetch_on_cpu_trains_exactly_like_torchtitans_loop(runs):
    history, output = runs
    assert "[input_pipeline] prefetch: batches move to cpu:0 one batch ahead" in output
    assert len(history["on"]) == 6
    # losses, grad norms, LRs and the loader's data metrics, step for step, bit for bit
    assert history["on"] == history["off"], json.dumps([history["on"], history["off"]], indent=1)


@pytest.mark.slow
def test_resume_with_prefetch_trains_the_batch_that_was_read_ahead(runs):
    history, _ = runs
    assert [h["step"] for h in history["resumed"]] == [4, 5, 6]
    assert history["resumed"] == history["on"][3:]
