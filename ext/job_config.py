"""Our configuration sections, merged into torchtitan's ``JobConfig``.

Name this module in ``[job] custom_config_module = "ext.job_config"`` (or
``--job.custom_config_module ext.job_config``): torchtitan's ConfigManager
imports it, merges the dataclasses below into its own (same-name sections
field by field, new sections added) and validates TOML keys against the
result. Importing it also registers our train specs and, on hosts without
an accelerator, the CPU support of :mod:`ext.device`, so a stock
``torchtitan.train`` picks everything up with no code change.
"""

from dataclasses import dataclass, field

from ext.attention.config import Attention, SkyLadder
from ext.data.config import Data
from ext.device import install_cpu_support
from ext.models import register_all as _register_specs
from ext.scheduler import LRScheduler


@dataclass
class Metrics:
    """Extends torchtitan's ``[metrics]`` section."""

    summary_file: str = "train_summary.json"
    """
    JSON file, relative to ``job.dump_folder``, that rank 0 writes when training
    ends: steps, first and last loss, tokens/s per device and the per-step
    history of loss, grad norm and LR. Empty string: print the one-line
    summary only.
    """


@dataclass
class JobConfig:
    """The sections this package adds to or extends in torchtitan's config."""

    metrics: Metrics = field(default_factory=Metrics)
    data: Data = field(default_factory=Data)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    attention: Attention = field(default_factory=Attention)
    skyladder: SkyLadder = field(default_factory=SkyLadder)


install_cpu_support()
_register_specs()
