"""Every documented entry point gets the same checkpoint safeguards:
run_train.sh / ``python -m ext.train`` (tested in test_checkpoint.py), stock
``python -m torchtitan.train`` with our config module, and a fork's own trainer
that imported torchtitan's CheckpointManager before our module loaded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import DEBUG_CONFIG, read_summary, run_command

CHECKPOINTING = ["--checkpoint.enable", "--checkpoint.interval", "4", "--metrics.log_freq", "1"]


def _stock(python: str, tmp_path: Path, steps: int, entry: list[str]):
    return run_command([
        python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *entry,
        "--job.config_file", str(DEBUG_CONFIG), "--job.dump_folder", str(tmp_path / "out"),
        "--training.steps", str(steps), *CHECKPOINTING,
    ])


def _fork_script(tmp_path: Path) -> str:
    """A fork's own trainer: torchtitan's train.py copied under another name (as
    forks do), so it builds ``CheckpointManager`` from the name it imported from
    ``torchtitan.components.checkpoint`` before our module was loaded."""
    import torchtitan.train

    script = tmp_path / "fork_train.py"
    script.write_text(Path(torchtitan.train.__file__).read_text())
    return str(script)


@pytest.mark.slow
def test_stock_torchtitan_train_and_a_forks_trainer_resume_from_the_newest_full_checkpoint(tmp_path, python):
    """A fork's trainer saves, then stock torchtitan.train resumes. Each run ends
    with a model-only checkpoint (torchtitan's default); the longer rerun must skip
    it and resume from the newest full one (torchtitan's own manager picks the
    model-only one and fails on its missing loader state)."""
    for steps, entry, skipped, resumed in (
        (8, [_fork_script(tmp_path)], None, None),
        (12, ["-m", "torchtitan.train"], 8, 4),
    ):
        proc = _stock(python, tmp_path, steps, entry)
        assert proc.returncode == 0, proc.output[-6000:]
        # a line only our manager logs (torchtitan's says nothing at a commit)
        assert re.search(rf"Checkpoint \S+/step-{steps} committed", proc.output), proc.output[-6000:]
        if skipped:
            assert f"step-{skipped} skipped: model weights only" in proc.output, proc.output[-6000:]
            assert f"Loading the checkpoint from {tmp_path / 'out' / 'checkpoint' / f'step-{resumed}'}" \
                in proc.output, proc.output[-6000:]
        history = read_summary(tmp_path / "out")["history"]
        assert [e["step"] for e in history] == list(range((resumed or 0) + 1, steps + 1))
        # torchtitan's own loop iterates the loader plainly; its statistics still reach our metrics
        assert re.search(r"data: pad [\d.]+%  docs cut", proc.output), proc.output[-6000:]
        assert "passes none on" not in proc.output, proc.output[-6000:]


def test_torchtitans_manager_class_builds_the_safe_one_and_a_forks_subclass_is_left_alone(tmp_path, caplog):
    import ext.job_config  # noqa: F401
    from torchtitan.components.checkpoint import CheckpointManager

    from ext.training.checkpoint import SafeCheckpointManager, install_checkpoint_manager

    assert install_checkpoint_manager() is True  # idempotent
    assert CheckpointManager.__init__.__wrapped__.__qualname__ == "CheckpointManager.__init__"

    class ForkManager(CheckpointManager):
        pass

    from torchtitan.config import JobConfig

    cfg = JobConfig().checkpoint  # checkpointing off: the constructor builds no state to save
    kwargs = dict(dataloader=None, model_parts=[], optimizers=None, lr_schedulers=None,
                  states={}, checkpoint_config=cfg, sd_adapter=None, base_folder=str(tmp_path))
    assert type(CheckpointManager(**kwargs)) is SafeCheckpointManager
    assert type(ForkManager(**kwargs)) is ForkManager
    assert "not torchtitan's" in caplog.text



# ------------------------------------- signals through run_train.sh / ext.launch

SIGNAL_RUN = ["--job.config_file", str(DEBUG_CONFIG), "--training.steps", "400", "--metrics.log_freq", "1",
              "--checkpoint.enable", "--checkpoint.interval", "1000"]


def _signal_run(tmp_path: Path, sig: int, **env: str) -> tuple[int, str]:
    from .test_checkpoint import _start, _wait_for_text

    log = tmp_path / "run.log"
    proc = _start([*SIGNAL_RUN, "--job.dump_folder", str(tmp_path / "out")], log, **env)
    try:
        _wait_for_text(proc, log, "step:  2 ")
        proc.send_signal(sig)
        return proc.wait(timeout=600), log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_sigusr1_to_the_launcher_reaches_the_rank_which_saves_and_stops(tmp_path):
    """`sbatch --signal=USR1@120`: torchrun's default signal list lacks SIGUSR1,
    which used to kill the launcher at once and leave the rank training."""
    import signal

    from ext.training.checkpoint import checkpoint_kind

    code, log = _signal_run(tmp_path, signal.SIGUSR1)
    assert code == 128 + signal.SIGUSR1, log[-4000:]
    assert "ext.launch: stopped by SIGUSR1" in log
    found = re.search(r"stopped by SIGUSR1 after step (\d+): checkpoint (\S+) saved", log)
    assert found, log[-4000:]
    assert checkpoint_kind(found.group(2)) == "full"


@pytest.mark.slow
def test_a_stop_whose_save_outlasts_the_grace_period_exits_3_and_says_nothing_was_saved(tmp_path):
    import signal

    from ext.launch import STOP_NOT_SAVED

    code, log = _signal_run(tmp_path, signal.SIGTERM, EXT_CHECKPOINT_HOLD_COMMIT="*",
                            TORCH_ELASTIC_SHUTDOWN_TIMEOUT="3")
    assert code == STOP_NOT_SAVED, log[-4000:]
    assert "the step reached was NOT saved" in log
    assert "ext.launch: stopped by SIGTERM\n" not in log
