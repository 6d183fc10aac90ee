"""torchtitan's Trainer with batches copied to the device one batch ahead.

torchtitan 0.2.2's ``train_step`` keeps the step's microbatches on the host,
counts their valid tokens there, and moves each one with a blocking
``.to(device)`` just before its forward pass. A blocking host-to-device copy
is issued on the compute stream and then waits for that stream to drain
(``memcpy_and_sync``): every microbatch lets the GPU run dry, and the copy
never overlaps compute. Its ``batch_generator`` reads batches without pinned
memory unless the loader pins them.

With ``[input_pipeline] prefetch = true`` (the default) this Trainer

- wraps the loader in a :class:`DevicePrefetcher`: when a batch is handed to
  the step, the next one is already read and its copy launched on a side CUDA
  stream, from pinned memory (pinned here if the loader did not), with
  ``non_blocking=True``. Handing a batch over makes the compute stream wait
  for that batch's copy event (the host never blocks) and marks its tensors
  with ``record_stream`` so the caching allocator does not reuse their memory
  while the compute stream may still read them (they were allocated on the
  side stream);
- replaces ``train_step``'s data half: valid tokens are counted on the host
  before the copy, and the count moves with a non-blocking copy. The rest of
  the step (forward/backward through torchtitan's ``forward_backward_step``,
  clipping, optimizer and scheduler steps, loss logging) does what
  torchtitan's does; with data parallelism the global token count is still
  torchtitan's ``dist_sum`` (one host sync per step, as in torchtitan, which
  keeps losses bit-identical); by then the next batch's copy is already
  queued, so it still overlaps compute;
- keeps checkpoints exact although the loader runs one batch ahead: the
  checkpointer saves the loader state from before the batch that is read
  but not yet trained on (snapshotted only when checkpointing is enabled),
  tokens are counted (``ntokens_seen``, tokens/s) when a batch is trained on,
  and the packed loader's statistics (padding, mixture, SkyLadder window)
  travel with their batch (:attr:`StagedBatch.stats`) and reach the metrics
  processor when it is trained on.

With or without prefetch, this Trainer reads the packed loader through
``batches_with_stats()`` and passes each batch's
:class:`ext.data.stats.BatchStats` explicitly to the metrics processor
(``add_loader_stats``) when the batch is trained on; torchtitan's own loop
reads batches only, and gets them through the loader's ``stats_sink``
(:func:`ext.training.metrics.connect_loader_stats`).

On a CPU the same path runs with copies that are no-ops: the batches, losses
and gradients are those of torchtitan's own loop (the tests compare them).
Other accelerators get non-blocking copies on the current stream.

Available through ``run_train.sh`` / ``python -m ext.train`` (or
``torchtitan.train.main(ext.training.trainer.Trainer)`` in a fork's own entry point).
The plugin path (stock ``-m torchtitan.train`` with ``ext.job_config``) runs
torchtitan's own Trainer, which ignores ``[input_pipeline]``.
"""

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torchtitan.components.checkpoint import DATALOADER
from torchtitan.components.dataloader import DataloaderExhaustedError
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer as TorchtitanTrainer

from ext.data.stats import BatchStats
from ext.training.checkpoint import SignalStop, stop_on_signal


@dataclass
class InputPipeline:
    """``[input_pipeline]``: how batches travel from the loader to the device."""

    prefetch: bool = True
    """
    Copy the next batch to the device while the current step computes: pinned
    host memory, ``non_blocking`` copies on a side CUDA stream, one batch
    ahead (double buffering). On a CPU the copies are no-ops and training is
    identical with or without it. Needs our trainer (``run_train.sh`` /
    ``python -m ext.train``); stock ``torchtitan.train`` ignores it.
    """


@dataclass
class Preemption:
    """``[preemption]``: what a termination signal does to a run."""

    save_on_signal: bool = True
    """
    On SIGTERM or SIGUSR1 (what torchrun forwards when it is stopped, what
    SLURM sends at scancel, at the time limit and with ``--signal``), finish
    the current step, save a full checkpoint of it (with ``[checkpoint]
    enable``), and stop with exit code 128 + the signal number. Rerunning the
    same command resumes from that checkpoint. The save must finish within
    torchrun's grace period (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``; run_train.sh
    sets 120 s unless it is set). false: the signals keep their default
    action (the process ends at once).
    """


class StagedBatch(NamedTuple):
    """A batch on the device, plus what the trainer needs to know on the host."""

    inputs: dict[str, Any]
    labels: torch.Tensor
    valid_tokens: int  # labels != IGNORE_INDEX, counted on the host before the copy
    load_seconds: float  # time spent reading it from the loader
    stats: BatchStats | None = None  # what the loader measured about it (None: the loader gives nothing)


class _Pending(NamedTuple):
    batch: StagedBatch
    copied: torch.cuda.Event | None  # recorded on the side stream after the copy
    loader_state: Any  # loader state from before this batch was read (or None)


class DevicePrefetcher:
    """Iterator over a loader's ``(inputs, labels)`` or ``(inputs, labels, stats)``
    batches, moved to ``device`` one batch ahead (double buffering).

    Contract of ``next()``: the returned :class:`StagedBatch` holds tensors on
    ``device`` that are safe to use on the stream that is current at the call
    (the stream waits for their copy; nothing is synchronized with the host),
    and the next batch has been read and its copy launched. Non-tensor values
    of ``inputs`` pass through unchanged; a batch's ``stats`` (e.g. the packed
    loader's :class:`ext.data.stats.BatchStats`) stay on the host and are
    handed out with it (:attr:`StagedBatch.stats`), never before. Raises
    ``StopIteration`` when the loader is spent.

    ``snapshot_state``, when given, is called before each batch is read; the
    value taken before the batch that is read but not yet handed out is
    :attr:`pending_loader_state` (what a checkpoint must hold).
    """

    def __init__(
        self,
        batches: Iterable[tuple[Any, ...]],
        device: torch.device,
        snapshot_state: Callable[[], Any] | None = None,
    ):
        self._source = iter(batches)
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if self._cuda else None
        self._snapshot_state = snapshot_state
        self._next: _Pending | None = None
        self._started = False

    @property
    def pending_loader_state(self) -> Any:
        """Loader state from before the batch read ahead, or None when none is."""
        return self._next.loader_state if self._next is not None else None

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the device: pinned and non-blocking on CUDA (current stream)."""
        if self._cuda and t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _read_next(self) -> None:
        self._next = None
        state = self._snapshot_state() if self._snapshot_state is not None else None
        start = time.perf_counter()
        try:
            inputs, labels, *stats = next(self._source)
        except StopIteration:
            return
        load_seconds = time.perf_counter() - start
        valid = int((labels != IGNORE_INDEX).sum())
        copied = None
        if self._stream is not None:
            # Allocated on the side stream; record_stream at hand-out covers their use.
            with torch.cuda.stream(self._stream):
                inputs = {k: self.to_device(v) if isinstance(v, torch.Tensor) else v
                          for k, v in inputs.items()}
                labels = self.to_device(labels)
                copied = self._stream.record_event()
        else:
            inputs = {k: self.to_device(v) if isinstance(v, torch.Tensor) else v
                      for k, v in inputs.items()}
            labels = self.to_device(labels)
        staged = StagedBatch(inputs, labels, valid, load_seconds, stats[0] if stats else None)
        self._next = _Pending(staged, copied, state)

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> StagedBatch:
        if not self._started:
            self._started = True
            self._read_next()
        pending = self._next
        if pending is None:
            raise StopIteration
        if pending.copied is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(pending.copied)
            for t in (*pending.batch.inputs.values(), pending.batch.labels):
                if isinstance(t, torch.Tensor):
                    t.record_stream(stream)
        self._read_next()  # launch the next copy before the caller computes on this batch
        return pending.batch


class _LoaderCheckpointState(Stateful):
    """What the checkpointer saves for the loader: its state from before the
    batch read ahead (so a resumed run trains on that batch), or its current
    state when nothing is read ahead. Loading goes straight to the loader."""

    def __init__(self, dataloader: Any, trainer: "Trainer"):
        self.dataloader = dataloader
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        prefetcher = self._trainer.prefetcher
        pending = prefetcher.pending_loader_state if prefetcher is not None else None
        checkpoint_state = getattr(self.dataloader, "checkpoint_state", None)
        if checkpoint_state is not None:  # the packed loader: a global state gathered from every rank
            return checkpoint_state(pending)
        return pending if pending is not None else self.dataloader.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.dataloader.load_state_dict(state_dict)


class Trainer(TorchtitanTrainer):
    """torchtitan's Trainer plus the ``[input_pipeline]`` device prefetch and
    the ``[preemption]`` checkpoint-and-stop on termination signals."""

    reads_loader_stats = True
    """It takes each batch's statistics from ``batches_with_stats()`` itself (see
    :func:`ext.training.metrics.connect_loader_stats`)."""

    prefetcher: DevicePrefetcher | None = None

    signal_stop: SignalStop | None = None

    def __init__(self, job_config: Any):
        super().__init__(job_config)
        preemption = getattr(job_config, "preemption", None)
        if preemption is not None and preemption.save_on_signal:
            self.signal_stop = SignalStop()
        section = getattr(job_config, "input_pipeline", None)
        self.prefetch = bool(section is not None and section.prefetch and self.dataloader is not None)
        if not self.prefetch:
            return
        checkpointer = self.checkpointer
        self._snapshot_loader = bool(
            (checkpointer.enable and not checkpointer.load_only)
            or getattr(checkpointer, "enable_ft_dataloader_checkpoints", False)
        )
        loader_state = _LoaderCheckpointState(self.dataloader, self)
        for states in (checkpointer.states, getattr(checkpointer, "ft_states", None)):
            if states is not None and states.get(DATALOADER) is self.dataloader:
                states[DATALOADER] = loader_state
        how = (
            "copied on a side CUDA stream from pinned memory, non_blocking"
            if self.device.type == "cuda" else "copies are no-ops on this device"
            if self.device.type == "cpu" else "non_blocking copies"
        )
        logger.info(f"[input_pipeline] prefetch: batches move to {self.device} one batch ahead ({how})")

    def should_continue_training(self) -> bool:
        """torchtitan's test, and a stop after this step when a rank got SIGTERM/SIGUSR1."""
        if not super().should_continue_training():
            return False
        if self.signal_stop is not None:
            signum = self.signal_stop.requested()
            if signum:
                raise stop_on_signal(signum, self.step, self.checkpointer)
        return True

    def batch_generator(self, data_iterable: Iterable) -> Iterator:
        # the packed loader's batches come with their statistics: (inputs, labels, BatchStats)
        with_stats = getattr(data_iterable, "batches_with_stats", None)
        batches = with_stats() if with_stats is not None else data_iterable
        if not self.prefetch:
            return super().batch_generator(self._stats_to_metrics(batches))
        self.prefetcher = DevicePrefetcher(
            batches,
            self.device,
            snapshot_state=(getattr(self.dataloader, "local_state", self.dataloader.state_dict)
                            if self._snapshot_loader else None),
        )
        return self.prefetcher

    def _add_loader_stats(self, stats: BatchStats | None) -> None:
        """One trained batch's loader statistics to the metrics processor (ours sums them per log)."""
        add = getattr(self.metrics_processor, "add_loader_stats", None)
        if stats is not None and add is not None:
            add(stats)

    def _stats_to_metrics(self, batches: Iterable[tuple[Any, ...]]) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        """Without prefetch: ``(inputs, labels)`` for torchtitan's loop, each batch's
        statistics passed on as torchtitan's loop takes the batch for its step."""
        for inputs, labels, *stats in batches:
            self._add_loader_stats(stats[0] if stats else None)
            yield inputs, labels

    def _next_microbatch(self, batches: DevicePrefetcher) -> StagedBatch:
        try:
            batch = next(batches)
        except StopIteration as ex:
            # as torchtitan: a step whose microbatches run out is not taken
            raise DataloaderExhaustedError() from ex
        self._add_loader_stats(batch.stats)
        ntokens = batch.labels.numel()
        self.ntokens_seen += ntokens
        self.metrics_processor.ntokens_since_last_log += ntokens
        self.metrics_processor.data_loading_times.append(batch.load_seconds)
        return batch

    def train_step(self, data_iterator: Iterator) -> None:
        if not isinstance(data_iterator, DevicePrefetcher):
            return super().train_step(data_iterator)
        self.optimizers.zero_grad()
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
        parallel_dims = self.parallel_dims

        microbatches = [self._next_microbatch(data_iterator)
                        for _ in range(self.gradient_accumulation_steps)]
        local_valid_tokens = data_iterator.to_device(
            torch.tensor(sum(b.valid_tokens for b in microbatches), dtype=torch.int64)
        )
        if parallel_dims.dp_enabled:
            global_valid_tokens = dist_utils.dist_sum(local_valid_tokens, parallel_dims.get_mesh("batch"))
        else:
            global_valid_tokens = local_valid_tokens.float()

        losses = [
            self.forward_backward_step(
                input_dict=b.inputs, labels=b.labels, global_valid_tokens=global_valid_tokens
            ).detach()
            for b in microbatches
        ]
        self._optimizer_step_and_log(losses, lr, local_valid_tokens, global_valid_tokens)

    def _optimizer_step_and_log(self, losses: list[torch.Tensor], lr: float,
                                local_valid_tokens: torch.Tensor, global_valid_tokens: Any) -> None:
        """The second half of torchtitan 0.2.2's ``train_step``, unchanged in effect."""
        parallel_dims = self.parallel_dims
        grad_norm = dist_utils.clip_grad_norm_(
            [p for m in self.model_parts for p in m.parameters()],
            self.job_config.training.max_norm,
            foreach=True,
            pp_mesh=parallel_dims.get_optional_mesh("pp"),
            ep_enabled=parallel_dims.ep_enabled,
        )
        self.checkpointer.maybe_wait_for_staging()
        self.optimizers.step()
        self.lr_schedulers.step()
        loss = torch.sum(torch.stack(losses))
        if not self.metrics_processor.should_log(self.step):
            return
        if parallel_dims.dp_cp_enabled:
            # loss = local loss sum / global valid tokens: the global mean is the sum
            # over ranks, the max of per-rank means rescales by the local count
            loss_mesh = parallel_dims.get_optional_mesh("loss")
            local_mean = loss * global_valid_tokens / local_valid_tokens
            ntokens = torch.tensor(self.ntokens_seen, dtype=torch.int64, device=self.device)
            global_avg_loss = dist_utils.dist_sum(loss, loss_mesh)
            global_max_loss = dist_utils.dist_max(local_mean, loss_mesh)
            global_ntokens_seen = dist_utils.dist_sum(ntokens, loss_mesh)
        else:
            global_avg_loss = global_max_loss = loss.item()
            global_ntokens_seen = self.ntokens_seen
        self.metrics_processor.log(
            self.step,
            global_avg_loss,
            global_max_loss,
            grad_norm.item(),
            extra_metrics={"n_tokens_seen": global_ntokens_seen, "lr": lr},
        )
