"""Training entry point: torchtitan's trainer with our extension loaded.

``run_train.sh`` runs ``torchrun ... -m ext.train --job.config_file X``.
Command-line arguments are torchtitan's (``--section.key value``). When
neither the command line nor the TOML names a ``[job] custom_config_module``,
``ext.job_config`` is added so that our sections parse; a module named by the
user is left alone (it can extend ours by importing it). The trainer is
:class:`ext.training.trainer.Trainer` (torchtitan's with the ``[input_pipeline]`` prefetch).
"""

from __future__ import annotations

import json
import os
import sys
import time
import tomllib

import ext.job_config  # noqa: F401  (registers specs, datasets, CPU support)
import torchtitan.train as torchtitan_train
from torchtitan.config import ConfigManager
from torchtitan.tools.logging import logger
from torchtitan.train import main

from ext.training.checkpoint import Preempted
from ext.core.errors import ConfigError, DataError, one_line
from ext.launch import STOP_REPORT_ENV
from ext.core.logs import quiet_known_noise
from ext.training.trainer import Trainer  # torchtitan's, plus the [input_pipeline] prefetch

CONFIG_MODULE = "ext.job_config"


def _spelling(option: str) -> str:
    """``--section.some-key`` -> ``--section.some_key`` (tyro, and so torchtitan, accepts both)."""
    return "--" + option[2:].replace("-", "_") if option.startswith("--") else option


def _option(argv: list[str], names: tuple[str, ...]) -> str | None:
    """Value of the first option of ``argv`` named one of ``names`` (either spelling)."""
    wanted = {_spelling(n) for n in names}
    for i, arg in enumerate(argv):
        key, eq, value = arg.partition("=")
        if _spelling(key) in wanted:
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return None


def _toml(config_file: str | None) -> dict:
    if not config_file:
        return {}
    try:
        with open(config_file, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return {}  # torchtitan reports the unreadable file itself


def _toml_section(argv: list[str], section: str) -> dict:
    return _toml(_option(argv, ("--job.config_file", "--job.config-file"))).get(section, {})


def with_config_module(argv: list[str]) -> list[str]:
    """``argv`` plus ``--job.custom_config_module=ext.job_config`` if none is named."""
    if _option(argv, ("--job.custom_config_module", "--job.custom-config-module")):
        return argv
    if _toml_section(argv, "job").get("custom_config_module"):
        return argv
    return [*argv, f"--job.custom_config_module={CONFIG_MODULE}"]


DP_KEYS = ("data_parallel_replicate_degree", "data_parallel_shard_degree")


def with_layout_defaults(argv: list[str], world_size: int, local_world_size: int) -> list[str]:
    """Several nodes and no data-parallel degrees given: HSDP, replicating across
    nodes and sharding within each (FSDP's all-gathers stay on the fast intra-node
    links). One node keeps torchtitan's default, FSDP over all its devices.
    Explicit ``[parallelism]`` degrees, in the TOML or on the command line, win."""
    nodes = world_size // max(local_world_size, 1)
    if nodes <= 1:
        return argv
    given = _toml_section(argv, "parallelism")
    if any(k in given or _option(argv, (f"--parallelism.{k}",)) is not None for k in DP_KEYS):
        return argv
    others = 1
    for key in ("tensor_parallel_degree", "pipeline_parallel_degree", "context_parallel_degree"):
        value = _option(argv, (f"--parallelism.{key}",)) or given.get(key, 1)
        others *= int(value)
    if local_world_size % others:
        return argv
    print(f"[parallelism] {nodes} nodes x {local_world_size} processes: HSDP by default "
          f"(replicate over {nodes} nodes, shard over {local_world_size // others} within each); "
          "set [parallelism] data_parallel_* degrees to choose another layout", file=sys.stderr)
    return [*argv, f"--parallelism.data_parallel_replicate_degree={nodes}",
            "--parallelism.data_parallel_shard_degree=-1"]


class _ArgvConfigManager(ConfigManager):
    """torchtitan's ConfigManager reading ``sys.argv`` when it parses: torchtitan's
    ``parse_args(args=sys.argv[1:])`` default is bound when torchtitan is imported,
    before :func:`with_config_module` added our sections (without this, ``--help``
    and configs that name no ``custom_config_module`` never saw them)."""

    def parse_args(self, args: list[str] | None = None):
        from ext.config_keys import config_file_of, toml_key_problems, tyro_prog

        args = sys.argv[1:] if args is None else args
        config_file = config_file_of(args)
        typos = toml_key_problems(args, _toml(config_file)) if config_file else []
        if typos:  # torchtitan's own message names no section and no fix
            raise ConfigError("; ".join(f"{config_file}: {t}" for t in typos))
        with tyro_prog(args):
            return super().parse_args(args)


def run(trainer_class: type = Trainer) -> None:
    """torchtitan's ``main``; a bad setting or data record found once the
    trainer runs (a checkpoint folder that holds only weights, a malformed
    record with ``[data] bad_records = "error"``) ends the process with its
    one-line message and exit code 2 instead of a traceback, and a stop on
    SIGTERM/SIGUSR1 (``[preemption]``, after its checkpoint) with 128 + the
    signal number."""
    torchtitan_train.ConfigManager = _ArgvConfigManager  # torchtitan's main() builds one
    quiet_known_noise()
    try:
        main(trainer_class)
    except Preempted as exc:  # saved and committed (checkpointing on); torchtitan closed the trainer
        logger.warning(str(exc))
        _record_for_torchrun(str(exc))
        _report_clean_stop(str(exc))
        sys.stderr.flush()
        sys.exit(128 + exc.signum)
    except (ConfigError, DataError) as exc:
        message = f"error: {one_line(exc)}"
        logger.error(message)
        _record_for_torchrun(message)
        sys.stderr.flush()
        sys.exit(2)


def _report_clean_stop(message: str) -> None:
    """Tell ``ext.launch`` that this rank finished its stop (its checkpoint,
    when checkpointing is on, is committed): a file per local rank in the
    folder the launcher names (``EXT_STOP_REPORT_DIR``)."""
    folder = os.environ.get(STOP_REPORT_ENV)
    if folder and os.path.isdir(folder):
        with open(os.path.join(folder, f"rank-{os.environ.get('LOCAL_RANK', '0')}"), "w") as f:
            f.write(message)


def _record_for_torchrun(message: str) -> None:
    """Replace the traceback torchtitan's ``@record`` wrote into torchrun's error
    file for this rank with ``message``: torchrun's failure summary then shows
    that line as the root cause. (The format is torchelastic's ErrorHandler's.)"""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    info = {"py_callstack": message, "timestamp": str(int(time.time()))}
    with open(path, "w") as f:
        json.dump({"message": {"message": message, "extraInfo": info}}, f)


if __name__ == "__main__":
    argv = with_config_module(sys.argv[1:])
    sys.argv[1:] = with_layout_defaults(
        argv, int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    )
    run()
