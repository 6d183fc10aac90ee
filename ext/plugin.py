"""The one step that plugs this package into torchtitan: :func:`install`.

``ext.job_config`` calls it once when torchtitan imports it (``[job]
custom_config_module = "ext.job_config"``), which covers ``run_train.sh``,
``python -m ext.train`` and stock ``python -m torchtitan.train``. A fork that
builds its own trainer may call it explicitly before building one::

    import ext.plugin
    ext.plugin.install()

It checks the installed torchtitan (:mod:`ext.compat`), applies every entry
of :data:`PATCHES` and registers our train specs (:mod:`ext.specs`).

:data:`PATCHES` is the whole list of torchtitan (and torch) names this
package replaces at run time, each with the function that replaces it and
why. Nothing else in the package assigns to another package's module or
class; :mod:`ext.compat` checks these names together with the ones we call
or subclass, so a fork that lacks one stops with one line.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Patch:
    targets: tuple[str, ...]
    """What is replaced: ``module:attribute`` (``Class.method`` for a method)."""
    installer: str
    """``module:function`` that applies it (idempotent), or that applies it per run."""
    why: str
    at_install: bool = True
    """False: applied later, per run, by ``installer`` (it needs the run's config)."""


PATCHES: tuple[Patch, ...] = (
    Patch(
        targets=("torchtitan.tools.utils:device_type", "torchtitan.tools.utils:device_module",
                 "torchtitan.distributed.utils:device_type", "torchtitan.distributed.utils:device_module",
                 "torchtitan.components.metrics:device_type", "torchtitan.components.metrics:device_module",
                 "torchtitan.distributed.parallel_dims:device_type", "torchtitan.tools.profiling:device_module",
                 "torchtitan.distributed.utils:set_pg_timeouts"),
        installer="ext.core.device:install_cpu_support",
        why="hosts without an accelerator: torchtitan fixes its device globals at import and assumes "
            "CUDA behind them; a CPU device module and gloo-safe timeouts (nothing changes on GPU hosts)",
    ),
    Patch(
        targets=("torchtitan.distributed.utils:set_determinism",),
        installer="ext.core.seeding:install",
        why="seed Python's and NumPy's RNGs per rank as well as torch's",
    ),
    Patch(
        targets=("torchtitan.components.checkpoint:CheckpointManager.__init__",),
        installer="ext.training.checkpoint:install_checkpoint_manager",
        why="every checkpoint manager, on every entry point, becomes SafeCheckpointManager "
            "(verified resume, manifests, stop saves, clear errors); the trainer that builds it gets "
            "the packed loader's statistics connected to its metrics processor",
    ),
    Patch(
        targets=("torch.distributed.checkpoint:FileSystemWriter.finish",),
        installer="ext.training.checkpoint:install_commit_hold",
        why="test hook, only when EXT_CHECKPOINT_HOLD_COMMIT is set: hold a save before its .metadata",
    ),
    Patch(
        targets=("torchtitan.tools.utils:get_peak_flops",),
        installer="ext.training.metrics:build_summary_metrics_processor",
        why="the peak torchtitan logs and divides by for MFU is ours ([metrics] peak_tflops or the "
            "device table), not lspci's guess with an A100 fallback",
        at_install=False,
    ),
)

def required_api() -> dict[str, tuple[str, ...]]:
    """:data:`ext.compat.API` plus every torchtitan name of :data:`PATCHES`."""
    from ext.compat import API

    api = {module: list(names) for module, names in API.items()}
    for patch in PATCHES:
        for target in patch.targets:
            module, name = target.split(":")
            if module.startswith("torchtitan") and name not in api.setdefault(module, []):
                api[module].append(name)
    return {module: tuple(names) for module, names in api.items()}



_installed = False


def _function(dotted: str):
    module, name = dotted.split(":")
    return getattr(importlib.import_module(module), name)


def install() -> None:
    """Check torchtitan, apply :data:`PATCHES` and register our train specs (idempotent)."""
    global _installed
    if _installed:
        return
    from ext.compat import check_torchtitan

    check_torchtitan(required_api())  # a fork without the API we build on stops here, with one line
    for patch in PATCHES:
        if patch.at_install:
            _function(patch.installer)()
    from ext.specs import register_all

    register_all()
    _installed = True
