"""Our configuration sections, merged into torchtitan's ``JobConfig``.

Name this module in ``[job] custom_config_module = "ext.job_config"`` (or
``--job.custom_config_module ext.job_config``): torchtitan's ConfigManager
imports it, merges the dataclasses below into its own (same-name sections
field by field, new sections added) and validates TOML keys against the
result. Importing it runs the plugin's install step once
(:func:`ext.plugin.install`: the torchtitan API check, the patches listed
in :data:`ext.plugin.PATCHES`, our train specs), so a stock
``torchtitan.train`` picks everything up with no code change.
"""

from dataclasses import dataclass, field

import ext.plugin

ext.plugin.install()  # checks torchtitan first: a fork without the API we build on stops here, with one line

from ext.data.config import Data, Sft  # noqa: E402
from ext.data.skyladder import SkyLadder  # noqa: E402
from ext.model.attention import Attention  # noqa: E402
from ext.model.moe import MoEConfig  # noqa: E402
from ext.training.eval import Eval  # noqa: E402
from ext.training.scheduler import LRScheduler  # noqa: E402
from ext.training.trainer import InputPipeline, Preemption  # noqa: E402


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

    peak_tflops: float = 0.0
    """
    Dense peak of one device in TFLOP/s, the denominator of MFU (bf16, or fp8
    when a float8/MX converter is on). 0: detect it from the device name
    (A100, H100 SXM/NVL/PCIe, H200, B200, MI300X, MI325X, MI355X; see
    ext/training/flops.py); on other devices, the CPU included, MFU is shown as n/a.
    """


@dataclass
class JobConfig:
    """The sections this package adds to or extends in torchtitan's config."""

    metrics: Metrics = field(default_factory=Metrics)
    data: Data = field(default_factory=Data)
    sft: Sft = field(default_factory=Sft)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    attention: Attention = field(default_factory=Attention)
    skyladder: SkyLadder = field(default_factory=SkyLadder)
    input_pipeline: InputPipeline = field(default_factory=InputPipeline)
    preemption: Preemption = field(default_factory=Preemption)
    moe: MoEConfig = field(default_factory=MoEConfig)
    eval: Eval = field(default_factory=Eval)

