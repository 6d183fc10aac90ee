"""The train spec's ``build_dataloader_fn``: ``[data]`` sources -> batches.

With ``[data] datasets`` empty, torchtitan's own text loader is used (so
``training.dataset`` keeps working). Otherwise this builds the packed
multi-source loader: checks the sources, chooses the worker count, and wraps
torchtitan's ``ParallelAwareDataloader`` (its checkpoint state keyed by dp
rank) so that

- each batch's loader statistics (padding, documents, mixture, bad records
  skipped per source, attention window, FLOP counts) come as one typed
  :class:`ext.data.stats.BatchStats`, summed from the rows' figures in the
  worker (:class:`ext.data.stats.StatsCollate`), and are handed out next to
  their batch by :meth:`PackedDataLoader.batches_with_stats`; nothing is
  collected process-wide (see :mod:`ext.data.stats`);
- only the keys the model takes are passed on (``input`` always,
  ``positions`` when ``reset_positions``, ``segment_ids`` when the spec's
  model consumes them);
- when any rank runs out of data, every rank stops at the same batch (a
  gloo all-reduce per batch when there are several ranks), logs why, and
  torchtitan ends training without a traceback.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import pickle
import signal
import weakref
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torchdata.stateful_dataloader import StatefulDataLoader
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.hf_datasets.text_datasets import build_text_dataloader

from ext.data.skyladder import masking_requested
from ext.data.skyladder import WindowClock, validate_skyladder
from ext.core.signals import STOP_SIGNALS
from ext.data.config import parse_num_workers, resolve_sources, SourceSpec
from ext.data.dataset import TRACE_ENV, PackedMixtureDataset
from ext.data.encoders import ChatEncoderSpec, TextEncoder
from ext.data.holdout import training_sources
from ext.data.sources import Plan
from ext.core.errors import ConfigError
from ext.core.parallel import host_group, reduce_host_int
from ext.core.seeding import seed_worker
from ext.data.stats import BatchStats, StatsCollate

logger = logging.getLogger(__name__)

MAX_AUTO_WORKERS = 8


def resolve_num_workers(value: int | str, specs: list[SourceSpec], dp_world_size: int) -> int:
    """Workers per rank: the configured integer, or "auto" = CPU cores per local
    rank minus one, at most 8 (any file is split by size over readers, so the
    shard count no longer limits them)."""
    explicit = parse_num_workers(value)
    if explicit is not None:
        return explicit
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(max(cores // local_ranks - 1, 0), MAX_AUTO_WORKERS)


def _shutdown_workers(loader_ref: "weakref.ref[PackedDataLoader]") -> None:
    """Stop a loader's (persistent) workers through the DataLoader's own shutdown."""
    loader = loader_ref()
    iterator = getattr(loader, "_iterator", None) if loader is not None else None
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def _reader_states(state: dict[str, Any], n_workers: int) -> list[dict[str, Any]]:
    """The dataset state of each worker (reader) in one rank's torchdata state."""
    if n_workers == 0:
        return [state.get("dataset_state") or {}]
    workers = state.get("_snapshot", {}).get("_worker_snapshots", {})
    return [(workers.get(f"worker_{w}") or {}).get("dataset_state") or {} for w in range(n_workers)]


class PackedDataLoader(ParallelAwareDataloader):
    """torchtitan's dataloader plus statistics, key filtering, a shared stop and a
    checkpoint state that any layout (dp ranks x workers) can resume.

    Batches: :meth:`batches_with_stats` yields ``(inputs, labels, BatchStats)``,
    the statistics of exactly that batch (our Trainer reads this); iterating
    the loader yields ``(inputs, labels)`` as torchtitan's loaders do. Unless
    a ``collate_fn`` is given, rows are collated by
    :class:`ext.data.stats.StatsCollate` (which :meth:`batches_with_stats` needs).

    Checkpoint state: ``{"global": pickle of {"dp_world_size", "num_workers",
    "ranks": [each dp rank's torchdata state, pickled]}, "world_size"}``. The
    same on every rank (gathered over the host gloo group when a checkpoint is
    taken, so DCP stores it once), so each rank of another layout can read
    every old reader's state. On the same layout a rank restores its own
    entry through torchdata (bit-exact); on another layout the readers' states
    are redistributed (:meth:`PackedMixtureDataset.redistribute`) and handed to
    the new workers through the dataset object, torchdata starting afresh.
    """

    def __init__(self, dataset: PackedMixtureDataset, dp_rank: int, dp_world_size: int,
                 model_keys: tuple[str, ...], **kwargs: Any):
        kwargs.setdefault("collate_fn", StatsCollate(dataset.stats_layout))
        super().__init__(dataset, dp_rank, dp_world_size, **kwargs)
        self.model_keys = model_keys
        self._stop_group = host_group()
        # Workers ignore SIGTERM (init_worker), and multiprocessing's own exit hook
        # would terminate (SIGTERM) and join them: stop them first, the normal way.
        atexit.register(_shutdown_workers, weakref.ref(self))

    def local_state(self) -> bytes:
        """This rank's torchdata state, pickled (cheap: what the prefetcher snapshots per batch)."""
        return pickle.dumps(StatefulDataLoader.state_dict(self))

    def checkpoint_state(self, local: bytes | None = None) -> dict[str, Any]:
        """The global state from every rank's ``local`` state (default: the current
        one). A collective over all ranks: call it where a checkpoint is saved."""
        mine = (self.dp_rank, self.local_state() if local is None else local)
        if self._stop_group is not None:
            gathered: list[Any] = [None] * dist.get_world_size(self._stop_group)
            dist.all_gather_object(gathered, mine, group=self._stop_group)
        else:
            gathered = [mine]
        ranks = dict(gathered)  # ranks sharing a dp rank (TP, PP) hold the same state
        state = {"dp_world_size": self.dp_world_size, "num_workers": self.num_workers,
                 "ranks": [ranks[r] for r in range(self.dp_world_size)]}
        if os.environ.get(TRACE_ENV):
            with open(os.path.join(os.environ[TRACE_ENV], "loader_state.pkl"), "wb") as f:
                pickle.dump(state, f)
        return {"global": pickle.dumps(state), "world_size": self.dp_world_size}

    def state_dict(self) -> dict[str, Any]:
        return self.checkpoint_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if "global" not in state_dict:  # saved by torchtitan's loader: its own layout only
            super().load_state_dict(state_dict)
            return
        self.load_global_state(pickle.loads(state_dict["global"]))

    def load_global_state(self, state: dict[str, Any]) -> None:
        d1, w1 = state["dp_world_size"], state["num_workers"]
        if (d1, w1) == (self.dp_world_size, self.num_workers):
            StatefulDataLoader.load_state_dict(self, pickle.loads(state["ranks"][self.dp_rank]))
            return
        old = [st for rank in state["ranks"] for st in _reader_states(pickle.loads(rank), w1)]
        w2 = max(self.num_workers, 1)
        new, summary = self.dataset.redistribute(old, self.dp_world_size * w2)
        self.dataset.by_worker = {w: new[self.dp_rank * w2 + w] for w in range(w2)}
        # torchdata's state_dict() (the checkpoint load's template) may have started
        # workers already, with the dataset as it was: stop them; iter() starts anew.
        _shutdown_workers(weakref.ref(self))
        StatefulDataLoader.load_state_dict(self, {})
        if self.dp_rank == 0:
            logger.warning(
                f"[data] resuming on another layout: {d1} dp rank(s) x {w1} worker(s) ({len(old)} readers) "
                f"-> {self.dp_world_size} x {self.num_workers} ({len(new)} readers); {summary}"
            )

    def _write_trace(self, trace: torch.Tensor) -> None:
        """Test hook (EXT_DATA_TRACE): one line per batch, the document pieces of each row."""
        rows = [[p for p in row.tolist() if p[0] >= 0] for row in trace]
        with open(os.path.join(os.environ[TRACE_ENV], f"rank{self.dp_rank}.jsonl"), "a") as f:
            f.write(json.dumps(rows) + "\n")

    def _everyone_has_a_batch(self, have: bool) -> bool:
        return bool(reduce_host_int(int(have), dist.ReduceOp.MIN, self._stop_group))

    stats_sink: Callable[[BatchStats], None] | None = None
    """Where :meth:`__iter__` hands each batch's statistics: set by
    :func:`ext.training.metrics.connect_loader_stats` when a training loop that
    iterates the loader plainly (torchtitan's own) is built with our metrics
    processor; None: the statistics are dropped."""

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """``(inputs, labels)`` per batch (torchtitan's contract); the statistics go
        to :attr:`stats_sink` when one is set."""
        for inputs, labels, stats in self.batches_with_stats():
            if self.stats_sink is not None:
                self.stats_sink(stats)
            yield inputs, labels

    def batches_with_stats(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, BatchStats]]:
        """``(inputs, labels, stats)`` per batch: the model's inputs, the labels and
        the :class:`BatchStats` of that batch's rows."""
        batches = super().__iter__()
        while True:
            batch = next(batches, None)
            if not self._everyone_has_a_batch(batch is not None):
                who = "this rank's" if batch is None else "a peer rank's"
                logger.warning(
                    f"[data] training data exhausted ({who} sources are spent; dp rank "
                    f"{self.dp_rank}): stopping here on every rank"
                )
                return
            sample, labels, stats = batch
            trace = sample.pop("trace", None)
            if trace is not None:
                self._write_trace(trace)
            yield {k: v for k, v in sample.items() if k in self.model_keys}, labels, stats


def _check_sources(plans: list[Plan], n_readers: int) -> None:
    for plan in plans:
        spec = plan.spec
        if spec.kind != "hub" and not plan.has_records():
            raise ConfigError(
                f"[data] source {spec.name!r} ({spec.location}) has no records; "
                "remove it from [data] datasets or fill it"
            )
        if len(plan) < n_readers:
            logger.warning(
                f"[data] source {spec.name!r} has {len(plan)} range(s) for {n_readers} readers "
                "(dp ranks x workers)" + (
                    ": every reader streams all of it and keeps every "
                    f"{n_readers}-th record" if spec.kind == "hub" else "; some readers get none of it"
                )
            )


def _encoder(job_config: Any, tokenizer: Any) -> TextEncoder | ChatEncoderSpec:
    """Plain text, or with ``[sft] enable`` chat samples (template checked here, in
    the main process, so a missing template fails before training starts)."""
    cfg, sft = job_config.data, getattr(job_config, "sft", None)
    if sft is None or not sft.enable:
        return TextEncoder(tokenizer.tokenizer, tokenizer.bos_id if cfg.add_bos else None,
                           tokenizer.eos_id if cfg.add_eos else None)
    roles = tuple(sft.train_roles)
    unknown = set(roles) - {"system", "user", "assistant", "tool"}
    if not roles or unknown:
        raise ConfigError(f"[sft] train_roles = {list(roles)}: use some of system, user, assistant, tool")
    spec = ChatEncoderSpec(job_config.model.hf_assets_path, sft.template_file, roles, sft.last_turn_only,
                           sft.mask_method, job_config.training.seq_len + 1, sft.overlong,
                           tuple(sorted(sft.template_kwargs.items())), sft.train_empty_think,
                           sft.dropped_reasoning)
    chat = spec.build().chat  # loads the tokenizer: errors (e.g. "generation" without tags) surface now
    logger.info(f"[sft] chat samples, trained roles {list(roles)}, masks by {chat.mask_method!r}"
                f"{', last turn only' if sft.last_turn_only else ''}, overlong samples: {sft.overlong}")
    return spec


def _check_token_folders(specs: list[SourceSpec], job_config: Any, tokenizer: Any) -> None:
    """Refuse (DataError, one line) a token folder written with another tokenizer
    or other BOS/EOS than this config's, or with missing/truncated shards."""
    tokens = [s for s in specs if s.kind == "tokens"]
    if not tokens:
        return
    from ext.data.tokenized import open_token_folder, tokenizer_identity

    sft = getattr(job_config, "sft", None)
    if sft is not None and sft.enable:
        raise ConfigError(f"[data] source {tokens[0].name!r} is a token folder, which holds no chat "
                          "loss masks; give [sft] its chat data as text (jsonl/parquet)")
    cfg = job_config.data
    encoding = (tokenizer.bos_id if cfg.add_bos else None, tokenizer.eos_id if cfg.add_eos else None)
    identity = tokenizer_identity(tokenizer.tokenizer)
    for spec in tokens:
        open_token_folder(spec.location, identity, encoding)


def _window_clock(job_config: Any, dp_world_size: int) -> WindowClock | None:
    sky = getattr(job_config, "skyladder", None)
    if sky is None or not sky.enable:
        return None
    training = job_config.training
    full = validate_skyladder(sky, training.seq_len, training.steps)
    per_step = training.local_batch_size * dp_world_size
    grad_accum = 1 if training.global_batch_size < 0 else training.global_batch_size // per_step
    attention = getattr(job_config, "attention", None)
    return WindowClock(sky, full, training.steps, training.local_batch_size, max(grad_accum, 1),
                       within_documents=bool(attention is None or attention.document_masking))


def init_worker(worker_id: int) -> None:
    """``worker_init_fn``: seeded host generators, and SIGTERM/SIGUSR1 ignored.

    A scheduler (SLURM's scancel, its time limit) signals every process of
    the job, loader workers included; a worker that died of it would break the
    step the trainer finishes before its checkpoint ([preemption]). Workers
    end with their trainer process either way (it shuts them down, or they
    notice it has gone; the loader stops them at exit before multiprocessing's
    exit hook would try SIGTERM).
    """
    seed_worker(worker_id)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def build_packed_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: Any,
    job_config: Any,
    **kwargs: Any,
):
    """Train-spec ``build_dataloader_fn`` (keyword arguments as torchtitan passes them)."""
    specs = training_sources(job_config.data, getattr(job_config, "eval", None))  # [eval] holdouts carved out
    if not specs:
        return build_text_dataloader(dp_world_size=dp_world_size, dp_rank=dp_rank,
                                     tokenizer=tokenizer, job_config=job_config, **kwargs)
    cfg = job_config.data
    _check_token_folders(specs, job_config, tokenizer)
    num_workers = resolve_num_workers(cfg.num_workers, specs, dp_world_size)
    pad_id = getattr(tokenizer, "pad_id", None)
    if pad_id is None:
        pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    seed = job_config.debug.seed if job_config.debug.seed is not None else 0
    dataset = PackedMixtureDataset(
        specs, cfg, _encoder(job_config, tokenizer), pad_id,
        job_config.training.seq_len, dp_rank, dp_world_size, seed,
        window_clock=_window_clock(job_config, dp_world_size),
    )
    _check_sources(dataset.plans, dp_world_size * max(num_workers, 1))
    keys = ("input",) + (("positions",) if cfg.reset_positions else ()) + (
        ("segment_ids",) if masking_requested(job_config) else ()
    )
    loader_kwargs: dict[str, Any] = {
        "batch_size": job_config.training.local_batch_size,
        "num_workers": num_workers,
        "pin_memory": torch.cuda.is_available(),
        "worker_init_fn": init_worker,
    }
    if num_workers > 0:
        loader_kwargs["persistent_workers"] = True
        prefetch = job_config.training.dataloader.prefetch_factor
        if prefetch is not None:
            loader_kwargs["prefetch_factor"] = prefetch
    logger.info(
        f"[data] {len(specs)} source(s) {[s.name for s in specs]}, target shares "
        f"{[round(s.prob, 4) for s in specs]} ({cfg.mixture_unit}), packing {cfg.packing}, "
        f"{num_workers} worker(s) per rank"
    )
    return PackedDataLoader(dataset, dp_rank, dp_world_size, keys, **loader_kwargs)
