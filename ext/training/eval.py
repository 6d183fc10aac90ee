"""Evaluation during training: held-out loss per source, and verifiers environments.

It plugs into torchtitan's validation hook: our train specs'
``build_validator_fn`` is :func:`build_ext_validator`, and torchtitan's
trainer calls ``should_validate(step)`` / ``validate(model_parts, step)``
after each step's checkpoint save. The two sections split the work:

- torchtitan's ``[validation]`` says *when and how much*: ``enable``,
  ``freq`` (we evaluate at step 1, every ``freq`` steps and at the last
  step), ``steps`` (batches per source per rank; -1: the whole held-out part)
  and ``local_batch_size``. Rows are packed at ``[training] seq_len``, like
  training (``[validation] seq_len`` is for torchtitan's own validator only).
- our ``[eval]`` says *what*: per ``[data]`` source a held-out part (a hash
  holdout fraction carved out of the training stream, or a separate file /
  folder / Hub split; see :mod:`ext.data.holdout`), and optional verifiers
  environments (:mod:`ext.training.eval_client`).

With ``[data] datasets`` empty (torchtitan's own loader), ``[validation]``
runs torchtitan's own validator on its ``dataset``, as before.

Held-out loss. Each source's held-out part is read, tokenized, masked (SFT:
assistant tokens only) and packed exactly as training reads its source (same
encoder, BOS/EOS, best-fit packing, document boundaries, segment ids and
positions; SkyLadder windows are not applied: eval measures full-context
loss). Records are read in file order (no shuffle) and the rows of the first
evaluation are kept in host memory (4 int64 tensors per row) and reused, so
every evaluation sees the same batches in the same order. Each data-parallel
rank packs the records of its own reader share (the same split over ranks as
training, :func:`ext.data.sources.reader_records`); ranks with fewer batches
run padding batches (labels all -100) so every rank makes the same number of
forward passes (FSDP needs that). Loss sums and trained-token counts per
source are all-reduced once per evaluation: the reported loss is the exact
token-weighted mean over the whole held-out part, per source and overall
(overall = all tokens of all sources), perplexity = exp(loss).

Logged to the console (one ``eval`` line), TensorBoard (``eval/loss``,
``eval/perplexity``, ``eval/<source>/loss``, ``.../perplexity``,
``.../tokens``; verifiers: ``eval/verifiers/<env>/reward``) and the run
summary (``train_summary.json`` ``"eval"``).

Evaluation does not disturb training: it runs under ``torch.no_grad`` with
every module in eval mode and restores each module's own ``training`` flag,
the torch (CPU and CUDA), numpy and Python RNG states afterwards, reads its
own datasets (the training loader and its checkpointed state are never
touched), and its wall time is left out of the training throughput
(tokens/s, MFU). The tests check that training losses are bit-identical with
evaluation on and off.
"""

import dataclasses
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.components.validate import BaseValidator, build_validator
from torchtitan.distributed.context_parallel import prepare_context_parallel_input
from torchtitan.tools.logging import logger

from ext.data.skyladder import masking_requested
from ext.data.dataset import PackedMixtureDataset
from ext.data.holdout import plan_holdout
from ext.data.loader import _encoder
from ext.core.device import run_device
from ext.core.errors import ConfigError


@dataclass
class Eval:
    """``[eval]``: what to evaluate (``[validation]`` says when and how much)."""

    holdout_fraction: list[float] = field(default_factory=list)
    """
    Per [data] source (one entry for all, or one per source): the fraction of
    its records held out by a hash of their content. Training never reads
    them; evaluation reads only them. 0 (default): no hash holdout. Takes
    effect whether or not [validation] is enabled, so runs with and without
    evaluation train on the same records.
    """

    datasets: list[str] = field(default_factory=list)
    """
    Per [data] source: a separate held-out location (local file or folder, or
    a Hub id), read with the source's text field; "" = none. Training reads
    its source unchanged. Exclusive with holdout_fraction for that source.
    """

    splits: list[str] = field(default_factory=list)
    """
    Per [data] source: the held-out split ("validation", "test") of the
    source's Hub dataset, or of the Hub dataset in `datasets`; "" = the
    source's own split. Local files have one split: use `datasets` instead.
    """

    tokens_per_source: int = 262144
    """
    Most held-out tokens read per source and evaluation, all data-parallel
    ranks together (rows of training.seq_len: ceil(tokens / (seq_len x dp))
    per rank), when [validation] steps = -1 (torchtitan's default, "all").
    Bounds an evaluation on a large source (it also runs at step 1). A
    positive [validation] steps wins; 0: the whole held-out part.
    """

    verifiers_envs: list[str] = field(default_factory=list)
    """
    verifiers environments (taskset ids; `pip install -e .[verifiers]`)
    evaluated at each evaluation: the model answers each task through an
    OpenAI-compatible endpoint on 127.0.0.1 serving generation from the
    current weights, the environment's rubric scores the answers, and the
    mean reward is logged per environment. Empty: none.
    """

    verifiers_num_examples: int = 8
    """Tasks per environment and evaluation (the first N of the taskset, in order)."""

    verifiers_max_tokens: int = 128
    """Most tokens generated per answer (also capped by seq_len minus the prompt)."""

    verifiers_temperature: float = 0.0
    """Sampling temperature of the answers; 0 = greedy."""

    verifiers_harness: str = "ext_chat_harness"
    """
    verifiers harness id that plays each task: "ext_chat_harness" (ours: one chat
    exchange in-process, no subprocess, no downloads), or "" for the taskset's own
    default (verifiers' `bash`/`null` chat programs run through `uv` in a subprocess).
    """

    verifiers_freq: int = 0
    """Run the environments only at evaluations whose step is a multiple of this (and the last step); 0: at every evaluation."""


def build_ext_validator(
    job_config: Any,
    dp_world_size: int,
    dp_rank: int,
    tokenizer: Any,
    parallel_dims: Any,
    loss_fn: Any,
    validation_context: Any,
    maybe_enable_amp: Any,
    metrics_processor: Any = None,
    pp_schedule: Any = None,
    pp_has_first_stage: bool | None = None,
    pp_has_last_stage: bool | None = None,
) -> BaseValidator:
    """Train-spec ``build_validator_fn``: :class:`HeldOutValidator` (torchtitan's
    own validator when ``[data] datasets`` is empty and no verifiers environment
    is configured)."""
    kwargs = dict(
        job_config=job_config, dp_world_size=dp_world_size, dp_rank=dp_rank, tokenizer=tokenizer,
        parallel_dims=parallel_dims, loss_fn=loss_fn, validation_context=validation_context,
        maybe_enable_amp=maybe_enable_amp, metrics_processor=metrics_processor, pp_schedule=pp_schedule,
        pp_has_first_stage=pp_has_first_stage, pp_has_last_stage=pp_has_last_stage,
    )
    eval_cfg = getattr(job_config, "eval", None)
    if not job_config.data.datasets and not (eval_cfg and eval_cfg.verifiers_envs):
        return build_validator(**kwargs)
    return HeldOutValidator(**kwargs)


@contextmanager
def undisturbed(model_parts: list[torch.nn.Module], metrics_processor: Any = None) -> Iterator[None]:
    """Eval mode and no grad inside; afterwards every module's ``training`` flag, the
    torch/CUDA/numpy/Python RNG states and the metrics processor's token counter are
    as before."""
    flags = [(m, m.training) for part in model_parts for m in part.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np_rng, py_rng = np.random.get_state(), random.getstate()
    ntokens = getattr(metrics_processor, "ntokens_since_last_log", None)
    try:
        for part in model_parts:
            part.eval()
        with torch.no_grad():
            yield
    finally:
        for module, was_training in flags:
            module.training = was_training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)
        if ntokens is not None:
            metrics_processor.ntokens_since_last_log = ntokens


Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


class HeldOutValidator(BaseValidator):
    """Per-source held-out loss (and verifiers environments) at validation steps.

    Batches reach the model as in the trainer's step (``prepare``: attention
    masks for flex/varlen from the model's ``get_attention_masks``,
    context-parallel sharding); torchtitan's own validation loader
    (``[validation] dataset``) is not built.
    """

    def __init__(
        self,
        job_config: Any,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: Any,
        parallel_dims: Any,
        loss_fn: Any,
        validation_context: Any,
        maybe_enable_amp: Any,
        metrics_processor: Any,
        pp_schedule: Any = None,
        pp_has_first_stage: bool | None = None,
        pp_has_last_stage: bool | None = None,
    ):
        BaseValidator.__init__(self, job_config)
        self.tokenizer = tokenizer
        self.parallel_dims = parallel_dims
        self.loss_fn = loss_fn
        self.validation_context = validation_context
        self.maybe_enable_amp = maybe_enable_amp
        self.metrics_processor = metrics_processor
        self.pp_schedule = pp_schedule
        self.pp_has_first_stage = pp_has_first_stage
        self.pp_has_last_stage = pp_has_last_stage
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.eval_cfg = job_config.eval
        plan = plan_holdout(job_config.data, self.eval_cfg)
        self.sources = [(t.name, h) for t, h in zip(plan.train, plan.heldout) if h is not None]
        if job_config.data.datasets and not self.sources and not self.eval_cfg.verifiers_envs:
            raise ConfigError(
                "[validation] enable = true but no [data] source has a held-out part; set [eval] "
                "holdout_fraction (e.g. [0.01]) or [eval] datasets / splits"
            )
        self.model_keys = ("input",) + (("positions",) if job_config.data.reset_positions else ()) + (
            ("segment_ids",) if masking_requested(job_config) else ()
        )
        self._batches: list[tuple[str, list[Batch]]] | None = None
        self._verifiers = None
        if self.eval_cfg.verifiers_envs:
            from ext.training.eval_client import VerifiersEval  # needs the optional `verifiers` package

            self._verifiers = VerifiersEval(job_config, tokenizer, parallel_dims, self.model_keys, self)
        what = [f"{name} ({_describe(spec)})" for name, spec in self.sources]
        rows = heldout_rows_per_rank(job_config, dp_world_size)
        batches = "all" if rows is None else -(-rows // job_config.validation.local_batch_size)
        logger.info(
            f"[eval] held-out: {', '.join(what) or 'none'}; every {job_config.validation.freq} steps, "
            f"{batches} batch(es) of {job_config.validation.local_batch_size} rows "
            f"per source per rank"
            + (f"; verifiers: {list(self.eval_cfg.verifiers_envs)}" if self._verifiers else "")
        )

    def should_validate(self, step: int) -> bool:
        return super().should_validate(step) or step == self.job_config.training.steps

    # -- held-out rows --------------------------------------------------------
    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_id", None)
        if pad is None:
            pad = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0
        return pad

    def _padding_batch(self, rows: int, seq_len: int) -> Batch:
        sample = {
            "input": torch.full((rows, seq_len), self._pad_id(), dtype=torch.int64),
            "positions": torch.arange(seq_len, dtype=torch.int64).expand(rows, seq_len).clone(),
            "segment_ids": torch.zeros((rows, seq_len), dtype=torch.int64),
        }
        return {k: v for k, v in sample.items() if k in self.model_keys}, torch.full(
            (rows, seq_len), IGNORE_INDEX, dtype=torch.int64
        )

    def _read_source(self, spec: Any, encoder: Any) -> list[Batch]:
        cfg = dataclasses.replace(self.job_config.data, shuffle=False)
        seq_len = self.job_config.training.seq_len
        seed = self.job_config.debug.seed if self.job_config.debug.seed is not None else 0
        dataset = PackedMixtureDataset(
            [spec], cfg, encoder, self._pad_id(), seq_len, self.dp_rank, self.dp_world_size, seed
        )
        batch_size = self.job_config.validation.local_batch_size
        max_rows = heldout_rows_per_rank(self.job_config, self.dp_world_size)
        samples: list[dict[str, torch.Tensor]] = []
        labels: list[torch.Tensor] = []
        said = time.perf_counter()
        for sample, label in dataset:  # the rows' loader statistics are not kept: only model_keys
            samples.append({k: v for k, v in sample.items() if k in self.model_keys})
            labels.append(label)
            if max_rows is not None and len(samples) >= max_rows:
                break
            if time.perf_counter() - said > PROGRESS_SECONDS:  # a long read is not silent
                said = time.perf_counter()
                logger.info(f"[eval] reading held-out {spec.name!r}: {len(samples):,} rows"
                            + (f" of {max_rows:,}" if max_rows else " (the whole held-out part)"))
        batches = []
        for at in range(0, len(samples), batch_size):
            chunk = samples[at : at + batch_size]
            inputs = {k: torch.stack([s[k] for s in chunk]) for k in self.model_keys}
            batch_labels = torch.stack(labels[at : at + batch_size])
            missing = batch_size - len(chunk)
            if missing:  # the same shape for every batch
                pad_inputs, pad_labels = self._padding_batch(missing, seq_len)
                inputs = {k: torch.cat([v, pad_inputs[k]]) for k, v in inputs.items()}
                batch_labels = torch.cat([batch_labels, pad_labels])
            batches.append((inputs, batch_labels))
        return batches

    def _build_batches(self) -> list[tuple[str, list[Batch]]]:
        start = time.perf_counter()
        encoder = _encoder(self.job_config, self.tokenizer)
        built = [(name, self._read_source(spec, encoder)) for name, spec in self.sources]
        counts = torch.tensor([len(b) for _, b in built], dtype=torch.int64, device=run_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        padding = self._padding_batch(self.job_config.validation.local_batch_size, self.job_config.training.seq_len)
        for (_, batches), wanted in zip(built, counts.tolist()):
            batches.extend([padding] * (wanted - len(batches)))
        logger.info(
            f"[eval] held-out batches per rank: "
            f"{', '.join(f'{name} {n}' for (name, _), n in zip(built, counts.tolist()))} "
            f"(read and packed in {time.perf_counter() - start:.1f} s; kept for later evaluations)"
        )
        return built

    # -- loss ---------------------------------------------------------------------
    def prepare(self, input_dict: dict[str, torch.Tensor], labels: torch.Tensor,
                model_parts: list[torch.nn.Module]) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
        """(inputs, labels, extra_inputs, extra_kwargs) as torchtitan's trainer makes them."""
        inputs = input_dict["input"]
        extra_inputs = {k: v for k, v in input_dict.items() if k != "input"}
        extra_kwargs: dict[str, Any] = {}
        model_args = getattr(model_parts[0], "model_args", None)
        if getattr(model_args, "attn_type", "sdpa") in ("flex", "varlen"):
            extra_kwargs["attention_masks"] = model_parts[0].get_attention_masks(
                input_batch=inputs, tokenizer=self.tokenizer, extra_inputs=extra_inputs
            )
        if self.parallel_dims.cp_enabled:
            inputs, labels, extra_kwargs = prepare_context_parallel_input(
                inputs, labels, extra_kwargs, self.parallel_dims.get_mesh("cp"), inputs.device,
                self.job_config.parallelism.context_parallel_load_balancer,
            )
        return inputs, labels, extra_inputs, extra_kwargs

    def _batch_loss(self, model_parts: list[torch.nn.Module], batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sum, trained tokens) of one batch on this rank (0, 0 on non-last PP stages)."""
        device = run_device()
        input_dict = {k: v.to(device) for k, v in batch[0].items()}
        labels = batch[1].to(device)
        inputs, labels, extra_inputs, extra_kwargs = self.prepare(input_dict, labels, model_parts)
        if self.parallel_dims.pp_enabled:
            last = bool(self.pp_has_last_stage)
            targets, losses = (labels, []) if last else (None, None)
            with self.validation_context():
                if self.pp_has_first_stage:
                    self.pp_schedule.eval(inputs, **extra_inputs, **extra_kwargs, target=targets, losses=losses)
                else:
                    self.pp_schedule.eval(**extra_kwargs, target=targets, losses=losses)
            if not last:
                zero = torch.zeros((), dtype=torch.float64, device=device)
                return zero, zero
            loss_sum = torch.sum(torch.stack(losses)).to(device)
        else:
            with self.validation_context(), self.maybe_enable_amp:
                loss_sum = self.loss_fn(model_parts[0](inputs, **extra_inputs, **extra_kwargs), labels)
        return loss_sum.double(), (labels != IGNORE_INDEX).sum().double()

    def heldout_metrics(self, model_parts: list[torch.nn.Module]) -> tuple[dict[str, float], str]:
        """Loss, perplexity and tokens per source and overall (all ranks), and the console text."""
        if self._batches is None:
            self._batches = self._build_batches()
        totals = torch.zeros(2 * len(self._batches), dtype=torch.float64, device=run_device())
        n_batches, done, said = sum(len(b) for _, b in self._batches), 0, time.perf_counter()
        for s, (name, batches) in enumerate(self._batches):
            for batch in batches:
                loss_sum, tokens = self._batch_loss(model_parts, batch)
                totals[2 * s] += loss_sum
                totals[2 * s + 1] += tokens
                done += 1
                if time.perf_counter() - said > PROGRESS_SECONDS:  # a long evaluation is not silent
                    said = time.perf_counter()
                    logger.info(f"[eval] {done}/{n_batches} batches ({name})")
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        totals = totals.cpu().tolist()
        copies = max(self.parallel_dims.tp, 1)  # tensor-parallel ranks count the same tokens
        metrics: dict[str, float] = {}
        parts = []
        for s, (name, _) in enumerate(self._batches):
            loss_sum, tokens = totals[2 * s], totals[2 * s + 1]
            loss = loss_sum / tokens if tokens else float("nan")
            if not tokens:
                logger.warning(f"[eval] source {name!r}: its held-out part gave no token; raise "
                               "[eval] holdout_fraction or check [eval] datasets")
            metrics.update({f"eval/{name}/loss": loss, f"eval/{name}/perplexity": _perplexity(loss),
                            f"eval/{name}/tokens": tokens / copies})
            parts.append(f"{name} {loss:.4f} (ppl {_perplexity(loss):.2f}, {tokens / copies:,.0f} tokens)")
        loss_sum, tokens = sum(totals[0::2]), sum(totals[1::2])
        loss = loss_sum / tokens if tokens else float("nan")
        metrics.update({"eval/loss": loss, "eval/perplexity": _perplexity(loss), "eval/tokens": tokens / copies})
        text = f"loss {loss:.4f}  ppl {_perplexity(loss):.2f}  |  " + "  ".join(parts)
        return metrics, text

    # -- the hook -------------------------------------------------------------------
    def validate(self, model_parts: list[torch.nn.Module], step: int) -> None:
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        texts = []
        with undisturbed(model_parts, self.metrics_processor):
            if self.sources:
                held, text = self.heldout_metrics(model_parts)
                metrics.update(held)
                texts.append(text)
            if self._verifiers is not None and self._verifiers_due(step):
                rewards = self._verifiers.run(model_parts, step)
                metrics.update({f"eval/verifiers/{env}/reward": r for env, r in rewards.items()})
                texts.append("verifiers " + "  ".join(f"{env} reward {r:.3f}" for env, r in rewards.items()))
        seconds = time.perf_counter() - start
        color = self.metrics_processor.color
        logger.info(f"{color.yellow}eval step {step:2}: {color.green}{'  |  '.join(texts)}  "
                    f"{color.reset}({seconds:.1f} s)")
        log_eval = getattr(self.metrics_processor, "log_eval", None)
        if log_eval is not None:
            log_eval(step, metrics, seconds)
        else:
            self.metrics_processor.logger.log(metrics, step)

    def _verifiers_due(self, step: int) -> bool:
        every = self.eval_cfg.verifiers_freq
        return every <= 0 or step % every == 0 or step == self.job_config.training.steps


PROGRESS_SECONDS = 15.0
"""A long held-out read or evaluation logs its progress this often."""


def heldout_rows_per_rank(job_config: Any, dp_world_size: int) -> int | None:
    """Held-out rows each rank reads per source: [validation] steps x local_batch_size
    when steps > 0, else [eval] tokens_per_source over seq_len and the ranks (None:
    all of them)."""
    steps = job_config.validation.steps
    if steps > 0:
        return steps * job_config.validation.local_batch_size
    budget = getattr(getattr(job_config, "eval", None), "tokens_per_source", 0)
    if budget <= 0:
        return None
    return -(-budget // (job_config.training.seq_len * max(dp_world_size, 1)))


def eval_read_note(job_config: Any, dp_world_size: int) -> str | None:
    """What one evaluation reads (for the preflight), or None when validation is off."""
    v = job_config.validation
    if not v.enable or not job_config.data.datasets:
        return None
    rows = heldout_rows_per_rank(job_config, dp_world_size)
    when = f"at step 1, every {v.freq} steps and the last"
    if rows is None:
        return (f"note: [eval] each evaluation ({when}) reads the whole held-out part of every source "
                "([validation] steps = -1, [eval] tokens_per_source = 0): on a large source this is long")
    batches = -(-rows // v.local_batch_size)
    tokens = rows * job_config.training.seq_len * max(dp_world_size, 1)
    return (f"note: [eval] each evaluation ({when}) reads at most {tokens:,} held-out tokens per source = "
            f"{batches} batch(es) of {v.local_batch_size} x {job_config.training.seq_len} per rank "
            f"({'[validation] steps' if v.steps > 0 else '[eval] tokens_per_source'})")


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0)) if not math.isnan(loss) else float("nan")


def _describe(spec: Any) -> str:
    if spec.holdout > 0:
        return f"hash holdout {spec.holdout:g}"
    return spec.location + (f" split {spec.split}" if spec.kind == "hub" else "")


def taskset_id_problem(env_id: str) -> str | None:
    """Why the verifiers 0.4 taskset id ``env_id`` does not resolve here, or None.

    An id names a Python module, resolved as verifiers does: ``owner/name@version``
    -> ``name``, hyphens -> underscores, lower case; first the built-in
    ``verifiers.v1.tasksets.<name>``, then the module ``<name>`` itself (a dotted
    path such as ``tests.verifiers_echo`` works from the repository root). The
    module exports its ``vf.Taskset`` subclass in ``__all__``.
    """
    import importlib.util

    module = env_id.rsplit("/", 1)[-1].split("@", 1)[0].replace("-", "_").lower()
    for target in (f"verifiers.v1.tasksets.{module}", module):
        try:
            if importlib.util.find_spec(target) is not None:
                return None
        except (ImportError, ValueError):  # a parent package is missing
            pass
    return (f"[eval] verifiers_envs: {env_id!r} does not resolve (no module {module!r} nor "
            f"verifiers.v1.tasksets.{module}); an id names an importable module whose __all__ exports a "
            "vf.Taskset subclass: pip install the environment's package, or put your module on PYTHONPATH "
            "(e.g. tests.verifiers_echo from the repository root)")


def eval_settings(cfg: Any, launch: Any) -> Iterator[str]:
    """The ``[eval]`` problems ``python -m ext.cli check`` and run_train.sh report before training."""
    eval_cfg = getattr(cfg, "eval", None)
    if eval_cfg is None:
        return
    plan = plan_holdout(cfg.data, eval_cfg)
    if cfg.validation.enable and cfg.data.datasets and not any(plan.heldout) and not eval_cfg.verifiers_envs:
        yield ("[validation] enable = true but no [data] source has a held-out part; set [eval] "
               "holdout_fraction (e.g. [0.01]) or [eval] datasets / splits")
    if eval_cfg.verifiers_envs:
        import importlib.util

        if importlib.util.find_spec("verifiers") is None:
            yield ("[eval] verifiers_envs needs the verifiers package; install it with "
                   "`pip install -e .[verifiers]` or set [eval] verifiers_envs = []")
        if cfg.parallelism.pipeline_parallel_degree > 1:
            yield "[eval] verifiers_envs cannot generate with pipeline parallelism; set [eval] verifiers_envs = []"
        for env_id in eval_cfg.verifiers_envs:
            problem = taskset_id_problem(env_id)
            if problem:
                yield problem
