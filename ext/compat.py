"""The torchtitan API this extension builds on, checked once at start.

We support torchtitan ``>=0.2.2,<0.3`` (pyproject): 0.2.2 and the 0.2.x forks
and dev builds after it that keep its API. 0.2.1 lacks modules we import
(``torchtitan.distributed.context_parallel``, among others); 0.3 replaced the
TOML configs and train-spec registry. A fork may still have renamed or
removed something we subclass, override, patch or call, which would
otherwise fail deep inside a run. :func:`check_torchtitan` looks every such
name up in :func:`ext.plugin.install` (``ext.job_config`` calls it, and
every entry point imports that first) and ends the process with one line naming what is missing.

:data:`API` is the list of names we subclass, override or call: ``module``
-> names, where ``Class.method`` is a method. The names we replace at run
time are listed once, in :data:`ext.plugin.PATCHES`;
:func:`ext.plugin.required_api` joins both. Add to them when the code starts to rely on another torchtitan
name.
"""

from __future__ import annotations

import importlib
import sys

SUPPORTED = ">=0.2.2,<0.3"

API: dict[str, tuple[str, ...]] = {
    "torchtitan.train": (
        "Trainer.__init__", "Trainer.should_continue_training", "Trainer.batch_generator",
        "Trainer.train_step", "Trainer.forward_backward_step", "Trainer.post_dataloading_process",
        "main", "ConfigManager",
    ),
    "torchtitan.components.checkpoint": (
        "CheckpointManager.save", "CheckpointManager.load",
        "CheckpointManager._should_save", "CheckpointManager.dcp_save", "CheckpointManager._async_wait",
        "CheckpointManager.close", "CheckpointManager._purge_stale_checkpoints",
        "CheckpointManager._find_load_step", "CheckpointManager._create_checkpoint_id",
        "AsyncMode", "DATALOADER",
    ),
    "torchtitan.components.dataloader": ("ParallelAwareDataloader", "DataloaderExhaustedError"),
    "torchtitan.components.metrics": (
        "MetricsProcessor.should_log", "MetricsProcessor.log", "MetricsProcessor.log_validation",
        "MetricsProcessor.close",
    ),
    "torchtitan.components.validate": ("BaseValidator.validate", "BaseValidator.should_validate",
                                       "build_validator"),
    "torchtitan.components.optimizer": ("build_optimizers", "build_optimizers_with_moe_load_balancing"),
    "torchtitan.components.lr_scheduler": ("LRSchedulersContainer",),
    "torchtitan.components.loss": ("IGNORE_INDEX", "build_cross_entropy_loss"),
    "torchtitan.components.tokenizer": ("HuggingFaceTokenizer", "build_hf_tokenizer"),
    "torchtitan.config": ("JobConfig", "ConfigManager", "ConfigManager._maybe_add_custom_config"),
    "torchtitan.protocols.train_spec": ("TrainSpec", "register_train_spec", "get_train_spec",
                                        "_extra_train_specs"),
    "torchtitan.models.attention": ("VarlenAttentionWrapper", "VarlenMetadata", "create_attention_mask"),
    "torchtitan.models.moe": ("MoE", "MoEArgs"),
    "torchtitan.models.moe.moe": ("GroupedExperts",),
    "torchtitan.distributed": ("ParallelDims",),
    "torchtitan.distributed.pipeline_parallel": ("pipeline_llm",),
    "torchtitan.distributed.context_parallel": ("prepare_context_parallel_input",),
    "torchtitan.hf_datasets.text_datasets": ("build_text_dataloader", "DATASETS"),
}


def missing_api(api: dict[str, tuple[str, ...]] = API) -> list[str]:
    """The dotted names of ``api`` that the installed torchtitan lacks."""
    missing = []
    for module_name, names in api.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(module_name)
            continue
        for name in names:
            obj = module
            for part in name.split("."):
                obj = getattr(obj, part, _MISSING)
                if obj is _MISSING:
                    missing.append(f"{module_name}.{name}")
                    break
    return missing


_MISSING = object()


def check_torchtitan(api: dict[str, tuple[str, ...]] = API) -> None:
    """End the process (exit 2, one line on stderr) when the installed
    torchtitan lacks any name of ``api`` (:func:`ext.plugin.required_api`
    when called by the install step)."""
    missing = missing_api(api)
    if not missing:
        return
    import torchtitan

    version = getattr(torchtitan, "__version__", "unknown version")
    shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
    print(f"error: torchtitan {version} at {torchtitan.__path__[0]} lacks {shown}, which ext subclasses, "
          f"overrides or calls; install torchtitan{SUPPORTED} with torchtitan 0.2.2's API "
          "(see ext/compat.py)", file=sys.stderr, flush=True)
    raise SystemExit(2)
