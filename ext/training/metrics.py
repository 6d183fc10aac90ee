"""torchtitan's metrics processor plus an end-of-run summary.

Every logged step is kept (step, loss, grad norm, LR, and the packed
loader's padding fraction, documents-cut fraction and realized mixture for
the window since the previous log, which also go to TensorBoard and a
``data:`` console line). The loader's figures arrive explicitly: our
Trainer (:mod:`ext.training.trainer`) passes each batch's
:class:`ext.data.stats.BatchStats` to :meth:`SummaryMetricsProcessor.add_loader_stats`
when the batch is trained on, and the processor sums them per log window
(torchtitan's own training loop, as stock ``torchtitan.train`` runs it, gets
them through the loader's ``stats_sink``: :func:`connect_loader_stats`; a loop
that gets them neither way shows no ``data:`` figures, warns once, and counts
every token as real, as with torchtitan's own loader). When the
trainer closes, rank 0 prints one line::

    run summary: 200 steps, loss 7.62 -> 3.91, 41,200 tokens/s per device

and, unless ``[metrics] summary_file`` is empty, writes the same figures and
the per-step history as JSON under ``job.dump_folder``. Tokens/s counts the
steps after the first logged one, so start-up and warm-up do not dilute it.

FLOPs and MFU (:mod:`ext.training.flops`): every log counts the model FLOPs of the
batches trained since the previous log over their non-padding tokens (SFT
prompts included), in two conventions, each named: ``palm`` (``6 N + 12 L H
d S`` per token, as torchtitan and published MFU count) and ``exact`` (the
pairs really attended: causal halves, document masks, SkyLadder windows;
from the loader's statistics, with torchtitan's own loader full causal
rows). torchtitan's own ``tflops`` and ``mfu`` columns show the palm
figure; a ``flops:`` line, TensorBoard (``flops/...``) and the history add
tokens/s (all, non-padding, trained), model FLOP/s and ``mfu_palm`` /
``mfu_exact`` side by side, hardware FLOP/s (with activation recomputation)
and HFU, against the peak of :func:`ext.training.flops.peak_from_config` ("n/a"
when unknown). That peak also replaces torchtitan's ``get_peak_flops`` (no
``lspci``, no A100 fallback).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch.distributed as dist
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.tools.logging import logger
from torchtitan.tools.utils import NoColor

from ext.data.stats import BatchStats
from ext.training.flops import FlopsMeter, UnsupportedModel, build_meter, install_peak_lookup, peak_from_config
from ext.core.logs import use_color


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class SummaryMetricsProcessor(MetricsProcessor):
    """MetricsProcessor that records each logged step and summarizes the run."""

    def __init__(
        self, job_config: JobConfig, parallel_dims: ParallelDims, tag: str | None = None,
        model_args: Any = None,
    ):
        peak = peak_from_config(job_config)
        install_peak_lookup(peak)  # before torchtitan's __init__ asks for it
        super().__init__(job_config, parallel_dims, tag)
        if not use_color():  # colour codes only on a terminal (ext.core.logs)
            self.color = NoColor()
        self._flops = _flops_meter(job_config, parallel_dims, model_args, peak)
        self.history: list[dict[str, float]] = []
        self._mix_tokens: dict[str, float] = {}  # tokens per source since the start (data: line)
        self.eval_history: list[dict[str, float]] = []  # ext.training.eval results, one entry per evaluation
        self._timed_tokens = 0
        self._timed_since: float | None = None
        self._timed_until: float | None = None
        self._closed = False
        self._last_step = 0  # the trainer asks should_log() once per step
        self._step_lr: float | None = None  # LR of the step just taken (optimizer hook)
        self._lr_every_step = bool(getattr(job_config.lr_scheduler, "log_every_step", False))
        self._skyladder = bool(getattr(getattr(job_config, "skyladder", None), "enable", False))
        self._loader_window: BatchStats | None = None  # the loader's figures since the last log
        self._batch_window: int | None = None  # attention window of the latest batch trained on
        self._bad_records: dict[str, int] = {}  # per source: bad records skipped since the run began
        self._said_no_loader_stats = False

    def add_loader_stats(self, stats: BatchStats) -> None:
        """The packed loader's statistics of a batch being trained on (the trainer
        calls this once per batch); summed until the next :meth:`log`."""
        self._loader_window = stats if self._loader_window is None else self._loader_window + stats
        self._batch_window = stats.max_window
        for name, n in stats.bad_records.items():
            self._bad_records[name] = self._bad_records.get(name, 0) + n

    # LR at every step: torchtitan passes "lr" to log() only at log_freq steps.
    # A post-step hook on the optimizers (set by the trainer) records the LR the
    # step used; should_log(), which the trainer calls once per step right after
    # the optimizer and scheduler step, sends it to TensorBoard on the other
    # steps and prints a compact console line (every step, or with
    # [lr_scheduler] log_every_step = false only on log steps). With SkyLadder on,
    # the attention window of the step's last batch rides along (console and
    # TensorBoard "data/step_attention_window").

    @property
    def optimizers(self):
        return self._optimizers

    @optimizers.setter
    def optimizers(self, value) -> None:
        self._optimizers = value
        if value is not None:
            value.register_step_post_hook(self._record_lr)

    def _record_lr(self, *_: Any) -> None:
        group = next(iter(self._optimizers)).param_groups[0]
        self._step_lr = float(group["lr"])

    def should_log(self, step: int) -> bool:
        self._last_step = step
        # the last step too, so that a run shorter than log_freq (or not a multiple
        # of it) ends its history and summary on the loss it finished with
        logged = super().should_log(step) or step == self.job_config.training.steps
        lr, self._step_lr = self._step_lr, None
        window = self._batch_window if self._skyladder else None
        if lr is not None:
            per_step = {"lr": lr}
            if window is not None:
                per_step["data/step_attention_window"] = window
            if not logged:
                self.logger.log(per_step, step)  # log() sends the LR on log steps
            elif window is not None:
                self.logger.log({"data/step_attention_window": window}, step)
            if logged or self._lr_every_step:
                color = self.color
                shown = f"  {color.cyan}window: {window}" if window is not None else ""
                logger.info(f"{color.red}step: {step:2}  {color.yellow}lr: {lr:.4e}{shown}{color.reset}")
        return logged

    def log(
        self,
        step: int,
        global_avg_loss: float,
        global_max_loss: float,
        grad_norm: float,
        extra_metrics: dict[str, Any] | None = None,
    ) -> None:
        tokens = self.ntokens_since_last_log
        loader, self._loader_window = self._loader_window, None
        packed = bool(getattr(self.job_config, "data", None) and self.job_config.data.datasets)
        if loader is None and packed and not self._bad_records and not self._said_no_loader_stats:
            self._said_no_loader_stats = True  # the packed loader, but a training loop that passes none on
            logger.warning(
                "data: the packed loader's statistics (the data: line, data/* metrics, exact FLOPs) reach the "
                "metrics through ext's Trainer or ext.training.metrics.connect_loader_stats(trainer); this "
                "training loop passes none on: FLOPs count every token as real and trained"
            )
        data_metrics = data_window_metrics(loader) if loader is not None else {}
        if data_metrics:  # bad records skipped so far, per source (window counts: data/bad_records/*)
            data_metrics.update({f"data/skipped/{name}": float(n) for name, n in self._bad_records.items()})
        flops_metrics = {}
        if self._flops is not None and tokens > 0:
            flops_metrics = self._flops.window(tokens, loader, time.perf_counter() - self.time_last_log)
            self.num_flops_per_token = self._flops.flops_per_token(tokens)  # torchtitan's tflops/mfu: palm
        extra_metrics = {**(extra_metrics or {}), **data_metrics, **flops_metrics}
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics)
        if data_metrics:
            # the window's share beside the run's: a window of few documents swings far from the targets
            real = loader.row_tokens - loader.pad_tokens
            shares = {k.removeprefix("data/mix/"): v for k, v in data_metrics.items() if k.startswith("data/mix/")}
            for name, share in shares.items():
                self._mix_tokens[name] = self._mix_tokens.get(name, 0.0) + share * real
            run_total = sum(self._mix_tokens.values()) or 1.0
            mix = " ".join(
                f"{name} {100 * share:.1f}% (run {100 * self._mix_tokens[name] / run_total:.1f}%)"
                for name, share in shares.items()
            )
            window = data_metrics["data/attention_window"]
            skipped = "  ".join(
                f"{name} {int(data_metrics.get(f'data/bad_records/{name}', 0))} (total {n})"
                for name, n in self._bad_records.items() if n
            )
            logger.info(
                f"data: pad {100 * data_metrics['data/pad_fraction']:.2f}%  docs cut "
                f"{100 * data_metrics['data/docs_cut_fraction']:.2f}%  window {window:.0f}  mix {mix}"
                + (f"  skipped bad records: {skipped}" if skipped else "")
            )
        if flops_metrics:
            logger.info(self._flops.line(flops_metrics))
        now = time.perf_counter()
        if self._timed_since is None:
            self._timed_since = now
        else:
            self._timed_tokens += tokens
            self._timed_until = now
            if flops_metrics:
                self._flops.add_last_to_timed()
        entry = {"step": step, "loss": float(global_avg_loss), "grad_norm": float(grad_norm)}
        for key in ("lr", *data_metrics, *flops_metrics):
            if key in extra_metrics:
                entry[key] = float(extra_metrics[key])
        self.history.append(entry)

    def summary(self) -> dict[str, Any] | None:
        """The run's figures, or None when no step was logged."""
        if not self.history:
            return None
        elapsed = (
            self._timed_until - self._timed_since
            if self._timed_since is not None and self._timed_until is not None
            else 0.0
        )
        return {
            "steps": max(self._last_step, self.history[-1]["step"]),
            "last_logged_step": self.history[-1]["step"],
            "first_loss": self.history[0]["loss"],
            "last_loss": self.history[-1]["loss"],
            "tokens_per_second_per_device": (
                self._timed_tokens / elapsed if elapsed > 0 else None
            ),
            **(self._flops.summary(elapsed) if self._flops is not None else {}),
            **({"skipped_bad_records": dict(self._bad_records)} if self._bad_records else {}),
            "history": self.history,
            **({"eval": self.eval_history} if self.eval_history else {}),
        }

    def log_eval(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        """Evaluation results (:mod:`ext.training.eval`) to TensorBoard and the summary; the
        ``seconds`` spent evaluating are left out of the training throughput."""
        self.logger.log(metrics, step)
        self.eval_history.append({"step": step, **{k: float(v) for k, v in metrics.items()}, "seconds": seconds})
        # evaluation runs after this step's log: shift every clock the next log measures from
        self.time_last_log += seconds
        if self._timed_since is not None:
            self._timed_since += seconds
        if self._timed_until is not None:
            self._timed_until += seconds

    def close(self) -> None:
        super().close()
        if self._closed:
            return
        self._closed = True
        summary = self.summary()
        if summary is None or not _is_rank0():
            return
        tps = summary["tokens_per_second_per_device"]
        tps_text = f"{tps:,.0f} tokens/s per device" if tps else "tokens/s n/a (one logged step)"
        if summary.get("mfu_palm_pct") is not None:
            tps_text += f", mfu_palm {summary['mfu_palm_pct']:.1f}%, mfu_exact {summary['mfu_exact_pct']:.1f}%"
        logger.info(
            f"run summary: {summary['steps']} steps, loss {summary['first_loss']:.4f} -> "
            f"{summary['last_loss']:.4f}, {tps_text}"
        )
        name = getattr(self.job_config.metrics, "summary_file", "")
        if name:
            path = os.path.join(self.job_config.job.dump_folder, name)
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=1)
            os.replace(tmp, path)


def data_window_metrics(stats: BatchStats) -> dict[str, float]:
    """The ``data/...`` metrics of the loader's figures of one log window."""
    real = max(stats.row_tokens - stats.pad_tokens, 1.0)
    metrics = {
        "data/pad_fraction": stats.pad_tokens / max(stats.row_tokens, 1.0),
        "data/docs_cut_fraction": stats.cut_docs / max(stats.docs, 1e-9),
        "data/attention_window": stats.window_sum / max(stats.rows, 1.0),
    }
    for name, tokens in stats.source_tokens.items():
        metrics[f"data/mix/{name}"] = tokens / real
    for name, bad in stats.bad_records.items():
        metrics[f"data/bad_records/{name}"] = float(bad)
    return metrics


def build_summary_metrics_processor(
    job_config: JobConfig,
    parallel_dims: ParallelDims,
    model_args: Any = None,
    tag: str | None = None,
) -> SummaryMetricsProcessor:
    """Train-spec ``build_metrics_processor_fn`` for our specs."""
    return SummaryMetricsProcessor(job_config, parallel_dims, tag, model_args=model_args)


def _flops_meter(
    job_config: Any, parallel_dims: ParallelDims, model_args: Any, peak: Any
) -> FlopsMeter | None:
    if peak.tflops is None:
        logger.warning(
            f"flops: {peak.describe()}: MFU is shown as n/a; set [metrics] peak_tflops "
            f"to its dense {peak.dtype} peak in TFLOP/s"
        )
    try:
        meter = build_meter(job_config, model_args, peak, parallel_dims.non_data_parallel_size)
    except UnsupportedModel as exc:
        logger.warning(f"flops: {exc}; tflops and mfu are torchtitan's estimate")
        return None
    logger.info(f"flops: {meter.describe()}")
    return meter


def connect_loader_stats(trainer: Any) -> bool:
    """Hand the packed loader's per-batch statistics to the metrics processor of
    a training loop that iterates the loader plainly (torchtitan's own
    ``Trainer``, as stock ``python -m torchtitan.train`` runs it): the loader
    calls ``metrics_processor.add_loader_stats`` for each batch it yields.
    Our Trainer (``reads_loader_stats``) reads
    :meth:`PackedDataLoader.batches_with_stats` itself and is left alone, so
    nothing is counted twice. Called
    once per trainer, when torchtitan builds its checkpoint manager (the one
    torchtitan object every entry point builds after both); True when connected."""
    from ext.data.loader import PackedDataLoader

    loader = getattr(trainer, "dataloader", None)
    metrics = getattr(trainer, "metrics_processor", None)
    if getattr(trainer, "reads_loader_stats", False):  # ours: batches_with_stats(), not a sink
        return False
    if not isinstance(loader, PackedDataLoader) or not hasattr(metrics, "add_loader_stats"):
        return False
    loader.stats_sink = metrics.add_loader_stats
    return True
