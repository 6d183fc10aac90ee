"""Checkpoints: one async save in flight, failures reported, kill-safe purging
and resume (ext/training/checkpoint.py), and exact resume of a real run after SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from .conftest import REPO, read_summary, run_train

MULTISOURCE = REPO / "train_configs" / "debug_multisource.toml"


# ------------------------------------------------------ the manager, in-process


class _Counter:
    """A Stateful with one number: stands for the trainer's and the loader's state."""

    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self):
        return {"value": torch.tensor(self.value)}

    def load_state_dict(self, state):
        self.value = int(state["value"])


@pytest.fixture
def process_group(tmp_path):
    # torchtitan's async checkpointing makes a gloo group: give it a 1-process world.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg-store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _manager(folder: Path, step_state: _Counter | None = None, **checkpoint):
    from torchtitan.components.lr_scheduler import LRSchedulersContainer
    from torchtitan.components.optimizer import OptimizersContainer
    from torchtitan.config import Checkpoint

    from ext.training.checkpoint import SafeCheckpointManager

    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    optimizers = OptimizersContainer([model], torch.optim.AdamW, {"lr": 1e-3})
    return SafeCheckpointManager(
        dataloader=_Counter(7),
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=LRSchedulersContainer(optimizers, lambda step: 1.0),
        states={"train_state": step_state or _Counter()},
        checkpoint_config=Checkpoint(enable=True, folder="checkpoint", **checkpoint),
        sd_adapter=None,
        base_folder=str(folder),
    )


def _steps(folder: Path) -> list[int]:
    from ext.training.checkpoint import step_folders

    return sorted(step_folders(str(folder / "checkpoint")))


def _interrupted_save(path: Path) -> None:
    """A step folder as a killed save leaves it: data written, no .metadata."""
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"\0" * 64)


def test_close_waits_for_the_save_in_flight(tmp_path, process_group):
    from ext.training.checkpoint import checkpoint_kind

    manager = _manager(tmp_path, async_mode="async", interval=1)
    manager.save(1)
    assert manager.save_future is not None  # saved in the background
    manager.close()
    assert manager.save_future is None
    assert checkpoint_kind(str(tmp_path / "checkpoint" / "step-1")) == "full"


def test_a_failed_background_save_is_reported_with_its_folder_and_cause(tmp_path, process_group):
    from ext.training.checkpoint import CheckpointSaveError

    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "step-2").write_text("a file where the save's folder must go")
    manager = _manager(tmp_path, async_mode="async", interval=1)
    manager.save(1)
    manager.save(2)  # fails in the background
    with pytest.raises(CheckpointSaveError, match=r"checkpoint save to .*step-2 failed: rank 0: FileExistsError"):
        manager.close()


def test_purge_counts_committed_checkpoints_and_the_save_in_flight_only(tmp_path, process_group):
    from ext.training.checkpoint import is_committed

    manager = _manager(tmp_path, async_mode="async", interval=1, keep_latest_k=2)
    manager.save(1)
    manager.save(2)
    _interrupted_save(tmp_path / "checkpoint" / "step-5")  # left by an earlier, killed run
    manager.save(3)  # in flight: kept with step-2; step-1 and the leftover go
    manager.close()  # joins the purge thread
    assert _steps(tmp_path) == [2, 3]
    assert all(is_committed(str(tmp_path / "checkpoint" / f"step-{s}")) for s in (2, 3))


def test_resume_takes_the_newest_full_checkpoint_and_says_what_it_skipped(tmp_path, process_group, caplog):
    from ext.training.checkpoint import checkpoint_kind

    trained = _Counter()
    manager = _manager(tmp_path, step_state=trained, interval=1)
    for step in (1, 2, 3):
        trained.value = step
        manager.save(step, last_step=step == 3)  # the last save is model-only (torchtitan's default)
    manager.close()
    _interrupted_save(tmp_path / "checkpoint" / "step-4")
    kinds = {s: checkpoint_kind(str(tmp_path / "checkpoint" / f"step-{s}")) for s in (1, 2, 3, 4)}
    assert kinds == {1: "full", 2: "full", 3: "model", 4: "incomplete"}

    resumed = _Counter()
    manager = _manager(tmp_path, step_state=resumed, interval=1)
    assert manager.load() is True
    assert resumed.value == 2
    assert "step-4 skipped: incomplete" in caplog.text and "step-3 skipped: model weights only" in caplog.text
    manager.close()


def test_a_folder_with_weights_only_is_an_error_not_a_fresh_start(tmp_path, process_group):
    from ext.core.errors import ConfigError

    manager = _manager(tmp_path, interval=5)
    manager.save(3, last_step=True)  # model-only
    manager.close()
    manager = _manager(tmp_path, interval=5)
    with pytest.raises(ConfigError, match=r"no resumable checkpoint.*initial_load_path .*step-3"):
        manager.load()
    manager.close()


def test_saving_a_step_again_first_invalidates_the_old_save(tmp_path, process_group):
    from ext.training.checkpoint import CheckpointSaveError, checkpoint_kind

    step1 = tmp_path / "checkpoint" / "step-1"
    manager = _manager(tmp_path, interval=1)
    manager.save(1)
    assert checkpoint_kind(str(step1)) == "full"
    # The second save of step 1 breaks off while writing its data: the old
    # .metadata must not survive to describe half-replaced files.
    data_file = next(step1.glob("*.distcp"))
    data_file.unlink()
    data_file.mkdir()
    with pytest.raises(CheckpointSaveError, match=r"step-1 failed: rank 0: IsADirectoryError"):
        manager.save(1)
    assert checkpoint_kind(str(step1)) == "incomplete"
    manager.close()


def test_shipped_configs_that_checkpoint_save_asynchronously():
    checkpointing = {}
    for path in sorted((REPO / "train_configs").glob("*.toml")):
        section = tomllib.loads(path.read_text()).get("checkpoint", {})
        if section.get("enable"):
            checkpointing[path.name] = section.get("async_mode", "disabled")
    assert "llama3_8b_multisource.toml" in checkpointing
    assert all(mode in ("async", "async_with_pinned_mem") for mode in checkpointing.values()), checkpointing


# ------------------------------------------- real runs: kill mid-save, resume

STEPS, INTERVAL = 8, 2
RUN = [
    "--job.config_file", str(MULTISOURCE), "--training.steps", str(STEPS), "--metrics.log_freq", "1",
    "--data.num_workers", "2", "--data.buffer_docs", "128", "--training.local_batch_size", "4",
]
CHECKPOINTS = [
    "--checkpoint.enable", "--checkpoint.interval", str(INTERVAL), "--checkpoint.async_mode", "async",
    "--checkpoint.keep_latest_k", "2",
]
HELD = 3 * INTERVAL  # the save that is killed; the one before it is the resume point


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (torchrun starts each trainer in its own session)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def _start(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    with open(log, "w") as out:
        env = {**os.environ, "EXT_SKIP_SETUP": "1", "EXT_SKIP_PREFLIGHT": "1", "NPROC": "1", **env}
        return subprocess.Popen(["./run_train.sh", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)


def _kill_during_save(dump: Path) -> str:
    """Run with checkpoints until the save of step HELD has written its data
    (EXT_CHECKPOINT_HOLD_COMMIT stops it right before .metadata), then SIGKILL
    every process of the run (torchrun, trainer, loader workers). Returns the log."""
    log = dump.parent / f"{dump.name}.log"
    proc = _start([*RUN, *CHECKPOINTS, "--job.dump_folder", str(dump)], log,
                  EXT_CHECKPOINT_HOLD_COMMIT=str(HELD))
    try:
        deadline = time.monotonic() + 600  # a hang guard, not a timing assertion
        while "holding before .metadata" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
    finally:
        for pid in _process_tree(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    return log.read_text()


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    straight = root / "straight"
    reference = _start([*RUN, "--job.dump_folder", str(straight)], root / "straight.log")  # alongside
    dump = root / "killed"
    _kill_during_save(dump)
    assert reference.wait(timeout=600) == 0, (root / "straight.log").read_text()[-4000:]
    folder = dump / "checkpoint"
    after_kill = {int(p.name.removeprefix("step-")): sorted(f.name for f in p.iterdir())
                  for p in folder.glob("step-*")}
    resumed = run_train([*RUN, *CHECKPOINTS, "--job.dump_folder", str(dump)])
    return {"straight": read_summary(straight), "resumed": read_summary(dump), "after_kill": after_kill,
            "resumed_log": resumed.output, "folder": folder}


@pytest.mark.slow
def test_resume_after_sigkill_repeats_the_straight_run_exactly(killed_and_resumed):
    # multi-source loader with 2 workers, SkyLadder on (debug_multisource.toml), fp32
    straight = {e["step"]: e for e in killed_and_resumed["straight"]["history"]}
    resumed = killed_and_resumed["resumed"]["history"]
    resume_point = HELD - INTERVAL
    assert [e["step"] for e in resumed] == list(range(resume_point + 1, STEPS + 1))
    for entry in resumed:
        reference = straight[entry["step"]]
        assert abs(entry["loss"] - reference["loss"]) < 1e-6, (entry, reference)
        assert abs(entry["grad_norm"] - reference["grad_norm"]) < 1e-6, (entry, reference)
        assert entry["data/attention_window"] == reference["data/attention_window"]


@pytest.mark.slow
def test_a_kill_during_a_save_keeps_the_previous_checkpoint_and_resume_skips_it(killed_and_resumed):
    after_kill, log = killed_and_resumed["after_kill"], killed_and_resumed["resumed_log"]
    previous = HELD - INTERVAL
    assert ".metadata" in after_kill[previous]
    assert ".metadata" not in after_kill[HELD] and any(n.endswith(".distcp") for n in after_kill[HELD])
    assert f"Checkpoint step-{HELD} skipped: incomplete" in log
    assert f"Loading the checkpoint from {killed_and_resumed['folder'] / f'step-{previous}'}" in log
    # the resumed run saved HELD again and the last step (model-only); keep_latest_k = 2
    # counts full checkpoints: the two newest (previous, HELD) stay beside the final weights
    assert sorted(int(p.name.removeprefix("step-")) for p in killed_and_resumed["folder"].glob("step-*")) \
        == [previous, HELD, STEPS]


# ------------------------------------- SIGTERM: finish the step, save, stop

STOPPED = re.compile(r"stopped by SIGTERM after step (\d+): checkpoint (\S+) saved")


def _wait_for_text(proc: subprocess.Popen, log: Path, text: str) -> None:
    deadline = time.monotonic() + 600  # a hang guard, not a timing assertion
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.05)


@pytest.fixture(scope="module")
def terminated_and_resumed(killed_and_resumed, tmp_path_factory):
    """The straight run's settings with checkpoints only at the end; SIGTERM to
    the launcher once step 1 is logged (what torchrun passes on to the rank),
    then the same command again."""
    dump = tmp_path_factory.mktemp("sigterm") / "run"
    args = [*RUN, "--checkpoint.enable", "--checkpoint.interval", "100", "--checkpoint.async_mode", "async",
            "--job.dump_folder", str(dump)]
    log = dump.parent / "stopped.log"
    proc = _start(args, log)
    _wait_for_text(proc, log, "step:  1 ")
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=600)
    resumed = run_train(args)
    return {"code": code, "log": log.read_text(), "resumed": read_summary(dump), "resumed_log": resumed.output,
            "straight": killed_and_resumed["straight"]}


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_and_the_rerun_continues_exactly(terminated_and_resumed):
    from ext.training.checkpoint import checkpoint_kind

    log = terminated_and_resumed["log"]
    assert terminated_and_resumed["code"] == 128 + signal.SIGTERM, log[-4000:]
    found = STOPPED.search(log)
    assert found, log[-4000:]
    step, folder = int(found.group(1)), found.group(2)
    assert 1 <= step < STEPS and folder.endswith(f"step-{step}")
    assert checkpoint_kind(folder) == "full"
    assert "ext.launch: stopped by SIGTERM" in log
    assert "Traceback" not in log and "forcefully exiting" not in log  # stopped within the grace period
    straight = {e["step"]: e for e in terminated_and_resumed["straight"]["history"]}
    resumed = terminated_and_resumed["resumed"]["history"]
    assert [e["step"] for e in resumed] == list(range(step + 1, STEPS + 1))
    for entry in resumed:
        reference = straight[entry["step"]]
        assert abs(entry["loss"] - reference["loss"]) < 1e-6, (entry, reference)
        assert entry["data/attention_window"] == reference["data/attention_window"]


def _rank_pid(launcher: int, rank: int) -> int:
    for pid in _process_tree(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"".join(environ):
            return pid
    raise AssertionError(f"no process of rank {rank} under {launcher}")


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step_with_one_checkpoint(tmp_path):
    from ext.training.checkpoint import checkpoint_kind

    dump, log = tmp_path / "run", tmp_path / "run.log"
    proc = _start([
        "--job.config_file", str(REPO / "train_configs" / "debug.toml"), "--training.steps", "1000",
        "--metrics.log_freq", "1", "--data.num_workers", "0", "--training.seq_len", "64",
        "--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "1",
        "--checkpoint.enable", "--checkpoint.interval", "1000", "--job.dump_folder", str(dump),
    ], log, NPROC="2", LOG_RANK="0,1")
    _wait_for_text(proc, log, "step:  2 ")
    os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)  # rank 1 only; the launcher is not signalled
    code = proc.wait(timeout=600)
    text = log.read_text()
    steps = {rank: re.search(rf"\[rank{rank}\]:.*stopped by SIGTERM after step (\d+)", text) for rank in (0, 1)}
    assert all(steps.values()), text[-4000:]
    step = int(steps[0].group(1))
    assert int(steps[1].group(1)) == step >= 2
    assert checkpoint_kind(str(dump / "checkpoint" / f"step-{step}")) == "full"
    assert code == 128 + signal.SIGTERM  # the ranks' exit code, through ext.launch
    assert "traceback : stopped by SIGTERM" in text and "Traceback" not in text


def test_signal_stop_notes_the_first_signal_and_says_what_was_saved(tmp_path):
    from ext.training.checkpoint import STOP_SIGNALS, SignalStop, stop_on_signal

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        stop = SignalStop()
        assert stop.requested() == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the first one is kept
        assert stop.requested() == signal.SIGUSR1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    class Off:
        def save_resumable(self, step):
            return None

    stopped = stop_on_signal(signal.SIGUSR1, 7, Off())
    assert stopped.signum == signal.SIGUSR1
    assert str(stopped) == "stopped by SIGUSR1 after step 7: nothing saved ([checkpoint] enable is off)"
    assert str(stop_on_signal(signal.SIGTERM, 0, Off())) == "stopped by SIGTERM after step 0: no step was trained"


# ------------------------------------- keep_latest_k, manifests, corruption


def test_keep_latest_k_counts_full_checkpoints_and_keeps_the_final_weights_besides(tmp_path, process_group):
    from ext.training.checkpoint import checkpoint_kind

    manager = _manager(tmp_path, interval=1, keep_latest_k=2)
    for step in (1, 2, 3, 4):
        manager.save(step, last_step=step == 4)  # step 4: model-only (torchtitan's default)
    manager.close()
    kinds = {s: checkpoint_kind(str(tmp_path / "checkpoint" / f"step-{s}")) for s in _steps(tmp_path)}
    assert kinds == {2: "full", 3: "full", 4: "model"}


def _saved(tmp_path: Path, steps: int = 2, **checkpoint) -> Path:
    trained = _Counter()
    manager = _manager(tmp_path, step_state=trained, interval=1, **checkpoint)
    for step in range(1, steps + 1):
        trained.value = step
        manager.save(step)
    manager.close()
    return tmp_path / "checkpoint"


def _resume(tmp_path: Path) -> int:
    resumed = _Counter()
    manager = _manager(tmp_path, step_state=resumed, interval=1)
    try:
        assert manager.load() is True
    finally:
        manager.close()
    return resumed.value


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_each_commit_writes_a_manifest_of_sizes_and_checksums(tmp_path, process_group, async_mode):
    import zlib

    from ext.training.checkpoint import MANIFEST

    folder = _saved(tmp_path, async_mode=async_mode) / "step-2"
    files = json.loads((folder / MANIFEST).read_text())["files"]
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    assert sorted(files) == on_disk and ".metadata" in files
    for name, entry in files.items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "crc32": zlib.crc32(data)}


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_the_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, process_group, caplog):
    folder = _saved(tmp_path)
    _flip_a_byte(folder / "step-2" / "__0_0.distcp")
    assert _resume(tmp_path) == 1
    assert "step-2 skipped: corrupted: __0_0.distcp does not match its checksum" in caplog.text


def test_a_truncated_data_file_is_caught_without_a_manifest(tmp_path, process_group, caplog):
    from ext.training.checkpoint import MANIFEST

    folder = _saved(tmp_path)
    (folder / "step-2" / MANIFEST).unlink()  # as an older checkpoint has none
    data = folder / "step-2" / "__0_0.distcp"
    size = data.stat().st_size
    data.write_bytes(data.read_bytes()[: size // 2])
    assert _resume(tmp_path) == 1
    assert f"step-2 skipped: corrupted: __0_0.distcp is truncated ({size // 2} of" in caplog.text


def test_a_truncated_metadata_file_is_named_as_corrupted_not_interrupted(tmp_path, process_group, caplog):
    folder = _saved(tmp_path)
    meta = folder / "step-2" / ".metadata"
    meta.write_bytes(meta.read_bytes()[:20])
    assert _resume(tmp_path) == 1
    assert "step-2 skipped: corrupted: .metadata cannot be read" in caplog.text


def test_an_intact_checkpoint_with_or_without_manifest_loads(tmp_path, process_group):
    from ext.training.checkpoint import MANIFEST

    folder = _saved(tmp_path)
    assert _resume(tmp_path) == 2
    (folder / "step-2" / MANIFEST).unlink()
    assert _resume(tmp_path) == 2


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KB tmpfs (needs root and mount rights, as in CI's container)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a small tmpfs here (needs root with mount rights)")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_a_full_disk_is_named_with_the_space_needed(tiny_disk, process_group, async_mode):
    from torchtitan.components.lr_scheduler import LRSchedulersContainer
    from torchtitan.components.optimizer import OptimizersContainer
    from torchtitan.config import Checkpoint

    from ext.training.checkpoint import CheckpointSaveError, SafeCheckpointManager

    model = nn.Linear(256, 256)  # 257 KB of weights: more than the disk holds
    optimizers = OptimizersContainer([model], torch.optim.AdamW, {"lr": 1e-3})
    manager = SafeCheckpointManager(
        dataloader=None, model_parts=[model], optimizers=optimizers,
        lr_schedulers=LRSchedulersContainer(optimizers, lambda step: 1.0), states={},
        checkpoint_config=Checkpoint(enable=True, folder="checkpoint", interval=1, async_mode=async_mode),
        sd_adapter=None, base_folder=str(tiny_disk),
    )
    with pytest.raises(CheckpointSaveError, match=r"no space left on the file system of .*needs about 257\.0 KB"):
        manager.save(1)
        manager.close()
