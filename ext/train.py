"""Training entry point: torchtitan's trainer with our extension loaded.

``run_train.sh`` runs ``torchrun ... -m ext.train --job.config_file X``.
Command-line arguments are torchtitan's (``--section.key value``). When
neither the command line nor the TOML names a ``[job] custom_config_module``,
``ext.job_config`` is added so that our sections parse; a module named by the
user is left alone (it can extend ours by importing it).
"""

from __future__ import annotations

import sys
import tomllib

import ext.job_config  # noqa: F401  (registers specs, datasets, CPU support)
from torchtitan.train import Trainer, main

CONFIG_MODULE = "ext.job_config"


def _option(argv: list[str], names: tuple[str, ...]) -> str | None:
    for i, arg in enumerate(argv):
        key, eq, value = arg.partition("=")
        if key in names:
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return None


def with_config_module(argv: list[str]) -> list[str]:
    """``argv`` plus ``--job.custom_config_module=ext.job_config`` if none is named."""
    if _option(argv, ("--job.custom_config_module", "--job.custom-config-module")):
        return argv
    config_file = _option(argv, ("--job.config_file", "--job.config-file"))
    if config_file:
        try:
            with open(config_file, "rb") as f:
                if tomllib.load(f).get("job", {}).get("custom_config_module"):
                    return argv
        except (OSError, tomllib.TOMLDecodeError):
            pass  # torchtitan reports the unreadable file itself
    return [*argv, f"--job.custom_config_module={CONFIG_MODULE}"]


if __name__ == "__main__":
    sys.argv[1:] = with_config_module(sys.argv[1:])
    main(Trainer)
