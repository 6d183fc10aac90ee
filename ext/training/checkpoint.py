"""Kill-safe checkpointing: torchtitan's CheckpointManager with the gaps closed.

torchtitan 0.2.2 already saves through ``dcp.async_save`` (``[checkpoint]
async_mode = "async"``) and waits for the previous save before it starts a
new one, so at most one save is in flight. DCP writes a step folder's data
files first and its ``.metadata`` last (to a temporary name, then renamed),
and torchtitan only resumes from folders that have ``.metadata``. What it
leaves open, and :class:`SafeCheckpointManager` closes:

- **Failures surface late or never.** A failed background save raised only
  when the *next* save waited for it (an interval later), and a save still in
  flight when training ended early (data exhausted, an exception) was never
  waited for: the process group was destroyed under it and the error lost.
  Here a finished save is checked at every step (a failure ends the run with
  ``checkpoint ... failed: <cause>``), and :meth:`close` waits for the save in
  flight before exit.
- **Purging counts interrupted saves.** ``keep_latest_k`` counted every
  ``step-N`` folder, so folders left by killed saves could push the last
  complete checkpoint out; two kills in a row could leave none, and a
  finished run kept one full checkpoint besides its final model-only one.
  Here ``keep_latest_k`` counts committed *full* checkpoints only; newer
  committed folders (the final weights-only save) and the save in flight
  are kept besides them; interrupted leftovers are deleted. torchtitan also
  never purged after the final save.
- **Corruption was found late or never.** A truncated data file failed the
  load with ``EOFError``, a flipped byte loaded silently (DCP has no
  checksums). Here rank 0 writes ``ext_manifest.json`` (size and CRC-32 of
  every file) after each commit; before loading, the ranks check each file
  against ``.metadata``'s offsets and, between them, against the manifest,
  and fall back to the newest intact full checkpoint with one warning
  naming the bad file.
- **Resuming could pick a checkpoint it cannot load.** The final save is
  model-only by default (``last_save_model_only``) or in HF format
  (``last_save_in_hf``); torchtitan picked it as the newest step and then
  failed to load optimizer and loader state from it. Here resume takes the
  newest *full* checkpoint (a model-only one only at step 0, the seed) and
  logs every newer folder it skipped and why.
- **Re-saving a step overwrote a committed folder in place.** When a step is
  saved again (a run resumed from an earlier step), the old ``.metadata``
  stayed valid while the new data files were written over the old ones, so a
  kill then left a folder that looks complete but mixes two saves. Here rank
  0 deletes the old commit marker before the save starts.
- ``last_save_in_hf`` (torch's ``HuggingFaceStorageWriter`` with
  consolidation) wrote only the safetensors and their index, plus the
  ``sharded/`` copy. Here rank 0 then removes ``sharded/``, checks the index
  against the model and adds ``config.json``, ``generation_config.json`` and
  the tokenizer files (``ext.model.hf.complete_hf_folder``, as ``dcp-to-hf``
  does), so ``transformers`` loads the folder directly.

:func:`install_checkpoint_manager` (called when ``ext.job_config`` is
imported) makes every torchtitan ``CheckpointManager`` built afterwards this
class: ``run_train.sh``, ``python -m ext.train``, stock ``python -m
torchtitan.train`` with our config module, and a fork's own trainer.

Test hook: with the environment variable ``EXT_CHECKPOINT_HOLD_COMMIT=N``
(or ``*``: every save) the save of step N writes all its data and then blocks before its
``.metadata`` (for 10 minutes, then the process exits), so a test can kill a
run in the middle of a save at a known point. Never set it in real runs.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import threading
import time
import zlib
from typing import Any, Callable

import torch.distributed as dist
from torchtitan.components.checkpoint import AsyncMode, CheckpointManager
from torchtitan.tools.logging import logger

from ext.core.errors import ConfigError
from ext.core.parallel import host_group, reduce_host_int
from ext.core.signals import STOP_SIGNALS

DCP_COMMIT = ".metadata"
HF_COMMIT = "model.safetensors.index.json"
HOLD_ENV = "EXT_CHECKPOINT_HOLD_COMMIT"
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointSaveError(RuntimeError):
    """A checkpoint save failed; the message names the folder and the cause."""


def step_folders(folder: str) -> dict[int, str]:
    """``{step: path}`` of the ``step-N`` folders directly under ``folder``."""
    if not os.path.isdir(folder):
        return {}
    found = {}
    for name in os.listdir(folder):
        match = _STEP_DIR.fullmatch(name)
        if match and os.path.isdir(os.path.join(folder, name)):
            found[int(match.group(1))] = os.path.join(folder, name)
    return found


def is_committed(path: str) -> bool:
    """True when the save of ``path`` finished (its last-written file exists)."""
    return os.path.isfile(os.path.join(path, DCP_COMMIT)) or os.path.isfile(
        os.path.join(path, HF_COMMIT)
    )


def checkpoint_kind(path: str) -> str:
    """What a step folder holds.

    ``"full"``: a DCP checkpoint with the training state (resumable);
    ``"model"``: DCP model weights only; ``"hf"``: Hugging Face safetensors;
    ``"incomplete"``: no commit marker, or unreadable DCP metadata (a save
    that was interrupted).
    """
    if os.path.isfile(os.path.join(path, DCP_COMMIT)):
        from torch.distributed.checkpoint import FileSystemReader

        try:
            keys = FileSystemReader(path).read_metadata().state_dict_metadata
        except Exception:  # a truncated or foreign .metadata
            return "incomplete"
        return "full" if any(k.startswith("train_state.") for k in keys) else "model"
    if os.path.isfile(os.path.join(path, HF_COMMIT)):
        return "hf"
    return "incomplete"


MANIFEST = "ext_manifest.json"
_CHUNK = 8 << 20


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(path: str) -> None:
    """Write ``path``'s manifest: the size and CRC-32 of every file of a
    committed DCP folder (DCP itself has no checksums). Written to a temporary
    name and renamed, so a manifest is whole or absent."""
    entries = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name != MANIFEST and not name.startswith(".ext-") and os.path.isfile(full):
            entries[name] = {"size": os.path.getsize(full), "crc32": _crc32(full)}
    tmp = os.path.join(path, f".ext-{MANIFEST}.tmp")
    with open(tmp, "w") as f:
        json.dump({"format": 1, "files": entries}, f)
    os.replace(tmp, os.path.join(path, MANIFEST))


def checkpoint_problem(path: str, share: tuple[int, int] = (0, 1)) -> str | None:
    """Why the committed DCP folder ``path`` cannot be loaded intact, or None.

    Every caller checks that each data file holds the bytes ``.metadata``
    places in it (a truncated file; works for folders without a manifest).
    With a manifest (:func:`write_manifest`), files ``i`` with ``i % n == r``
    for ``share = (r, n)`` are also checked for their size and CRC-32, so
    ``n`` ranks read the checkpoint once between them.
    """
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(path).read_metadata().storage_data or {}
    except Exception:
        return f"{DCP_COMMIT} cannot be read (truncated or corrupted)"
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        full = os.path.join(path, name)
        have = os.path.getsize(full) if os.path.isfile(full) else -1
        if have < size:
            return f"{name} is {'missing' if have < 0 else f'truncated ({have} of {size} bytes)'}"
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        return None
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        return f"{MANIFEST} cannot be read"
    rank, n = share
    for i, (name, want) in enumerate(sorted(files.items())):
        if i % n != rank:
            continue
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        if os.path.getsize(full) != want["size"]:
            return f"{name} has {os.path.getsize(full)} bytes, the manifest says {want['size']}"
        if _crc32(full) != want["crc32"]:
            return f"{name} does not match its checksum (corrupted)"
    return None


_SKIP_REASON = {  # why a folder is not resumable, by checkpoint_kind
    "incomplete": "incomplete (no .metadata: its save was interrupted)",
    "model": "model weights only (checkpoint.last_save_model_only), no training state",
    "hf": "Hugging Face safetensors (checkpoint.last_save_in_hf), no training state",
}


def newest_resumable(
    folder: str, problem: Callable[[str], str | None] | None = None
) -> tuple[int, list[tuple[int, str]]]:
    """The newest step to resume from in ``folder`` (-1 if none), and the newer
    folders passed over as ``(step, why)``. A full checkpoint qualifies, and a
    model-only one at step 0 (torchtitan's seed checkpoint), unless
    ``problem(path)`` names a reason it cannot be loaded intact."""
    skipped = []
    for step, path in sorted(step_folders(folder).items(), reverse=True):
        kind = checkpoint_kind(path)
        if kind == "full" or (kind == "model" and step == 0):
            why = problem(path) if problem else None
            if why is None:
                return step, skipped
            skipped.append((step, f"corrupted: {why}"))
            continue
        if kind == "incomplete" and os.path.isfile(os.path.join(path, DCP_COMMIT)):
            skipped.append((step, f"corrupted: {DCP_COMMIT} cannot be read (truncated or corrupted)"))
            continue
        skipped.append((step, _SKIP_REASON[kind]))
    return -1, skipped


def _cause(exc: BaseException) -> str:
    """One line for a save failure: the first rank's root error for DCP's
    CheckpointException (which carries every rank's traceback)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, failure = min(failures.items(), key=lambda item: item[0])
        root = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {type(root).__name__}: {root}"
    return f"{type(exc).__name__}: {exc}"


def _state_nbytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: what a save writes, about."""
    if isinstance(state, dict):
        return sum(_state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_nbytes(v) for v in state)
    local = getattr(state, "to_local", None)  # a DTensor: this rank's shard
    tensor = local() if callable(local) else state
    if hasattr(tensor, "element_size") and hasattr(tensor, "numel"):
        return tensor.numel() * tensor.element_size()
    return 0


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1024 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def _out_of_space(path: str, exc: BaseException, needed: int) -> str | None:
    """"no space left on ..." when the failure looks like a full disk: ENOSPC
    somewhere in the error, or less room left than this rank's share of the
    save (torch's writer reports a full disk as ``unexpected pos ...``)."""
    chain, seen = [exc], set()
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        chain += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    enospc = False
    while chain:
        e = chain.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        enospc |= isinstance(e, OSError) and e.errno == errno.ENOSPC
        chain += [e.__cause__, e.__context__]
    probe = os.path.abspath(path)
    while not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if not enospc and free >= needed:
        return None
    return (f"no space left on the file system of {probe} ({_human(free)} free; this rank's part "
            f"of the checkpoint needs about {_human(needed)}): free space or point [checkpoint] folder "
            "/ [job] dump_folder at a larger disk")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class SafeCheckpointManager(CheckpointManager):
    """torchtitan's CheckpointManager with prompt failures, a final wait, safe
    purging and resume, and loadable ``last_save_in_hf`` folders (module doc).

    Adds no constructor state, so :func:`install_checkpoint_manager` can turn a
    manager built by torchtitan's own constructor into this class in place.
    """

    _inflight: str | None = None  # folder of the save in flight (async modes)

    # ------------------------------------------------------------------ saving

    def save(self, curr_step: int, last_step: bool = False) -> None:
        self._check_finished_save()
        saving = self._should_save(curr_step, last_step)
        super().save(curr_step, last_step)
        if saving and last_step:  # torchtitan returns before purging here
            if self.last_save_in_hf:
                self._complete_hf_folder(self._create_checkpoint_id(curr_step))
            self._purge_stale_checkpoints()

    _forced_step: int | None = None

    def save_resumable(self, curr_step: int) -> str | None:
        """Save a full (resumable) checkpoint of ``curr_step`` now, whatever the
        interval, and wait until it is committed. Returns its folder, or None
        when checkpointing is off. A step already saved in full is not saved again."""
        if not self.enable or self.load_only:
            return None
        path = self._create_checkpoint_id(curr_step)
        if self._inflight != path and checkpoint_kind(path) != "full":
            self._forced_step = curr_step
            try:
                self.save(curr_step)
            finally:
                self._forced_step = None
        self._async_wait()
        return path

    def _should_save(self, curr_step: int, last_step: bool = False) -> bool:
        if curr_step == self._forced_step:
            return True
        return super()._should_save(curr_step, last_step)

    def dcp_save(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: str,
        async_mode: AsyncMode,
        enable_garbage_collection: bool = False,
        to_hf: bool = False,
    ):
        self._invalidate(checkpoint_id)
        self._save_nbytes = _state_nbytes(state_dict)
        try:
            result = super().dcp_save(
                state_dict, checkpoint_id, async_mode, enable_garbage_collection, to_hf
            )
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a synchronous save, or staging, failed
            raise self._save_error(checkpoint_id, exc) from exc
        if async_mode == AsyncMode.DISABLED:
            logger.info(f"Checkpoint {checkpoint_id} committed.")
            self._start_manifest(checkpoint_id)
        else:
            self._inflight = checkpoint_id
        return result

    _save_nbytes = 0  # tensor bytes of this rank's part of the latest save

    def _save_error(self, path: str, exc: BaseException) -> CheckpointSaveError:
        why = _out_of_space(path, exc, self._save_nbytes) or _cause(exc)
        return CheckpointSaveError(f"checkpoint save to {path} failed: {why}")

    def _invalidate(self, checkpoint_id: str) -> None:
        """Delete a committed folder's markers before saving into it again.

        Only rank 0 deletes; other ranks write no data before the save's
        planning collective, which rank 0 joins after this.
        """
        if _rank() != 0:
            return
        self._join_manifest()
        manifest = os.path.join(checkpoint_id, MANIFEST)
        if os.path.isfile(manifest):
            os.remove(manifest)
        for name in (DCP_COMMIT, HF_COMMIT):
            marker = os.path.join(checkpoint_id, name)
            if os.path.isfile(marker):
                logger.warning(
                    f"Saving over the existing checkpoint {checkpoint_id}: removed its {name} "
                    "first, so an interrupted save cannot pass for a complete one."
                )
                os.remove(marker)

    def _check_finished_save(self) -> None:
        """Report a background save that has finished (raise if it failed)."""
        future = getattr(self, "save_future", None)
        if future is not None and future.done():
            self._async_wait()

    def _async_wait(self) -> None:
        future = getattr(self, "save_future", None)
        if future is None:
            super()._async_wait()
            return
        path = self._inflight or "(in flight)"
        began = time.monotonic()
        pending = not future.done()
        try:
            super()._async_wait()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            self.save_future = None
            self._inflight = None
            raise self._save_error(path, exc) from exc
        self.save_future = None
        self._inflight = None
        waited = f" (waited {time.monotonic() - began:.2f}s for it)" if pending else ""
        logger.info(f"Checkpoint {path} committed{waited}.")
        self._start_manifest(path)
        self._purge_stale_checkpoints()  # counts it now that it is a committed full checkpoint

    _manifest_thread: threading.Thread | None = None

    def _start_manifest(self, path: str) -> None:
        """Rank 0 writes ``path``'s manifest in a background thread (it reads
        the whole checkpoint back); the next one and :meth:`close` wait for it.
        A run killed before it finishes leaves a checkpoint without manifest,
        which loads after the size check only."""
        if _rank() != 0 or not os.path.isfile(os.path.join(path, DCP_COMMIT)):
            return
        self._join_manifest()

        def write() -> None:
            try:
                write_manifest(path)
            except OSError as exc:
                logger.warning(f"Checkpoint {path}: manifest not written ({exc}); it will load unverified.")

        self._manifest_thread = threading.Thread(target=write, name="ext-manifest", daemon=True)
        self._manifest_thread.start()

    def _join_manifest(self) -> None:
        if self._manifest_thread is not None:
            self._manifest_thread.join()
            self._manifest_thread = None

    def close(self) -> None:
        try:
            if getattr(self, "enable", False) and getattr(self, "save_future", None) is not None:
                logger.info(f"Waiting for the checkpoint save in flight ({self._inflight}) before exit.")
                self._async_wait()
        finally:
            self._join_manifest()
            super().close()

    # ----------------------------------------------------------------- purging

    def _purge_stale_checkpoints(self) -> None:
        if self.keep_latest_k <= 0 or _rank() != 0 or not os.path.isdir(self.folder):
            return
        if self.enable_ft_dataloader_checkpoints and not (
            self.ft_manager and self.ft_manager.participating_rank() == 0
        ):
            return
        folders = step_folders(self.folder)
        full = sorted(step for step, path in folders.items() if checkpoint_kind(path) == "full")
        oldest_kept = full[-self.keep_latest_k] if len(full) >= self.keep_latest_k else -1
        inflight = None
        if self._inflight and getattr(self, "save_future", None) is not None:
            match = _STEP_DIR.fullmatch(os.path.basename(os.path.normpath(self._inflight)))
            same = os.path.dirname(os.path.abspath(self._inflight)) == os.path.abspath(self.folder)
            inflight = int(match.group(1)) if match and same else None
        for step, path in sorted(folders.items()):
            # keep: the newest k full checkpoints, any committed folder newer than
            # them (a final model-only / HF save) and the save in flight
            newer = step >= oldest_kept and is_committed(path)
            if step != inflight and not newer:
                self.purge_queue.put(path)

    # ----------------------------------------------------------------- loading

    def _find_load_step(self, folder: str = "") -> int:
        if folder and os.path.abspath(folder) != os.path.abspath(self.folder):
            return super()._find_load_step(folder)  # TorchFT's per-replica loader folders
        group = host_group()  # collective: every rank loads
        rank, n = (dist.get_rank(), dist.get_world_size()) if group is not None else (0, 1)

        def problem(path: str) -> str | None:
            # each rank checks its share of the files; all agree on the verdict
            mine = checkpoint_problem(path, (rank, n))
            if reduce_host_int(int(mine is not None), dist.ReduceOp.MAX, group) == 0:
                return None
            return mine or "a data file failed its check on another rank (see that rank's log)"

        began = time.monotonic()
        step, skipped = newest_resumable(self.folder, problem)
        if step >= 0:
            logger.info(f"Checkpoint step-{step} verified in {time.monotonic() - began:.1f}s.")
        for newer, why in skipped:
            use = f"resuming from step-{step}" if step >= 0 else "no checkpoint to resume from"
            logger.warning(f"Checkpoint step-{newer} skipped: {why}; {use}.")
        weights = {s: why for s, why in skipped if why in (_SKIP_REASON["model"], _SKIP_REASON["hf"])}
        if step < 0 and weights:
            newest = max(weights)
            raise ConfigError(
                f"checkpoint.folder {self.folder} holds no resumable checkpoint, only weights "
                f"(step-{newest}); to start a new run from them, use another job.dump_folder "
                f"with --checkpoint.initial_load_path {os.path.join(self.folder, f'step-{newest}')} "
                "--checkpoint.initial_load_model_only"
                + (" --checkpoint.initial_load_in_hf" if weights[newest] == _SKIP_REASON["hf"] else "")
            )
        return step

    # ------------------------------------------------------------ HF last save

    def _complete_hf_folder(self, path: str) -> None:
        """Make a ``last_save_in_hf`` folder loadable by transformers (rank 0).

        torch's ``HuggingFaceStorageWriter`` (torchtitan's) keeps writing the
        weights, since every rank writes its own part; the folder is then
        checked and completed by :func:`ext.model.hf.complete_hf_folder`, the
        step ``dcp-to-hf`` ends with too: its index must list exactly the
        model's HF tensors (no ``lm_head.weight`` when tied: ``to_hf`` left it
        out) with their shapes, then config.json, generation_config.json and the
        tokenizer files are written. A folder that fails the check gets a
        warning and no config.json, so transformers does not load it.
        """
        if _rank() != 0:
            return
        from ext.model.hf import HFFolderError, complete_hf_folder

        adapter = self.sd_adapter
        model_args = getattr(adapter, "model_args", None)
        if model_args is None:
            logger.warning(
                f"{path}: the state-dict adapter exposes no model_args, so no config.json was "
                "written; convert a DCP checkpoint with `python -m ext.cli dcp-to-hf` instead."
            )
            return
        shutil.rmtree(os.path.join(path, "sharded"), ignore_errors=True)
        # Bias balancing with last_save_in_hf is refused at start unless [moe]
        # allow_routing_drift (ext.model.moe.moe_args_from_config); say what was dropped.
        parts = getattr(self.states.get("model"), "model", [])
        biases = [m.expert_bias for part in parts for m in part.modules()
                  if getattr(m, "expert_bias", None) is not None]
        if any(bool(b.any()) for b in biases):
            logger.warning(
                f"{path}: [moe] allow_routing_drift: the MoE routing biases (moe.expert_bias) are not "
                "in this Hugging Face folder; it picks other experts for some tokens than the trained model."
            )
        try:
            complete_hf_folder(
                path,
                model_args,
                dtype=self.export_dtype,
                tokenizer_dir=getattr(adapter, "hf_assets_path", None),
            )
        except HFFolderError as exc:
            logger.warning(
                f"{path}: not a complete Hugging Face folder ({exc}); no config.json was written. "
                "Convert the last full DCP checkpoint with `python -m ext.cli dcp-to-hf` instead."
            )
            return
        logger.info(f"{path}: Hugging Face folder (config, generation config, tokenizer) complete.")


def install_commit_hold() -> None:
    """The ``EXT_CHECKPOINT_HOLD_COMMIT`` test hook (module doc)."""
    step = os.environ.get(HOLD_ENV)  # a step number, or "*": every save
    if not step:
        return
    from torch.distributed.checkpoint import FileSystemWriter

    original = FileSystemWriter.finish
    if getattr(original, "_ext_hold", False):
        return

    def finish(self, metadata, results):
        name = os.path.basename(os.path.normpath(str(self.path)))
        if name == f"step-{step}" or (step == "*" and _STEP_DIR.fullmatch(name)):
            logger.warning(
                f"{HOLD_ENV}={step}: data of {self.path} written; holding before .metadata (pid {os.getpid()})"
            )
            time.sleep(600)  # the test kills the run meanwhile; never outlive a forgotten one
            os._exit(17)
        return original(self, metadata, results)

    finish._ext_hold = True  # type: ignore[attr-defined]
    FileSystemWriter.finish = finish


def install_checkpoint_manager() -> bool:
    """Make every torchtitan ``CheckpointManager`` a :class:`SafeCheckpointManager`.

    The hook sits in torchtitan's class itself (its ``__init__`` turns a
    plain ``CheckpointManager`` into ours once built; ours adds no state of
    its own), not in a module attribute, so every entry point gets it:
    ``run_train.sh`` / ``python -m ext.train``, stock ``python -m
    torchtitan.train`` (whose code then runs as ``__main__``, a module
    object a rebinding of ``torchtitan.train.CheckpointManager`` would not
    reach), and a fork's own trainer that imported ``CheckpointManager``
    from ``torchtitan.components.checkpoint`` before this ran. A fork's own
    subclass of it is left alone, with one warning. Idempotent; returns
    True once installed.

    The same hook connects the packed loader's statistics to the metrics
    processor of the trainer that builds the manager
    (:func:`ext.training.metrics.connect_loader_stats`): torchtitan's trainer
    builds it after both, passing itself as ``states["train_state"]``, so
    stock ``torchtitan.train`` shows the ``data:`` line and exact FLOPs too.
    """
    init = CheckpointManager.__init__
    if getattr(init, "_ext_safe", False):
        return True

    def __init__(self: CheckpointManager, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        trainer = (kwargs.get("states") or {}).get("train_state")  # torchtitan's Trainer passes itself
        if trainer is not None:
            from ext.training.metrics import connect_loader_stats

            connect_loader_stats(trainer)
        cls = type(self)
        if cls is CheckpointManager:
            self.__class__ = SafeCheckpointManager
        elif not issubclass(cls, SafeCheckpointManager):
            logger.warning(
                f"the checkpoint manager is {cls.__module__}.{cls.__name__}, not torchtitan's; "
                "leaving it (ext.training.checkpoint's save/resume safeguards are off for this run)."
            )

    __init__._ext_safe = True  # type: ignore[attr-defined]
    __init__.__wrapped__ = init  # type: ignore[attr-defined]
    CheckpointManager.__init__ = __init__  # type: ignore[method-assign]
    return True


# ------------------------------------------------------- stopping on a signal



class Preempted(Exception):
    """The run stopped on a termination signal (after saving, when it could)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class SignalStop:
    """SIGTERM / SIGUSR1 noted by a handler, agreed on by every rank at a step boundary.

    The handler only records the signal. :meth:`requested` is called by every
    rank at the same point of the loop; with several processes the ranks
    agree through an all-reduce (MAX) on a CPU (gloo) group, so they stop
    after the same step even when the signal reached them at different times,
    and no GPU stream is synchronized for it.
    """

    def __init__(self) -> None:
        self.received = 0
        self._group = host_group()  # collective: every rank builds it
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        if not self.received:
            self.received = signum

    def requested(self) -> int:
        """The signal number any rank received (0: none)."""
        return reduce_host_int(self.received, dist.ReduceOp.MAX, self._group)


def stop_on_signal(signum: int, step: int, checkpointer: Any) -> Preempted:
    """Save a resumable checkpoint of ``step`` (when checkpointing is on and a
    step was trained) and return the exception that ends the run."""
    name = signal.Signals(signum).name
    saved = checkpointer.save_resumable(step) if step > 0 else None
    if saved:
        what = f"checkpoint {saved} saved; run the same command to resume from it"
    elif step > 0:
        what = "nothing saved ([checkpoint] enable is off)"
    else:
        what = "no step was trained"
    return Preempted(signum, f"stopped by {name} after step {step}: {what}")
