"""Preflight: every problem of a config, found before any model is built.

:func:`check` runs each check on the parsed JobConfig and returns one line
per problem, each naming the key and the fix; nothing is left on disk
(writability is tested by creating and removing a file in the nearest
existing folder). ``python -m ext.cli
check --job.config_file X`` prints them and exits 2; ``run_train.sh`` (our
entry point) runs the same checks first and stops the same way.

The launch context (world size, processes per node, CUDA) comes from
torchrun's environment when present, else from this host.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch

from ext.core.errors import ConfigError


@dataclass(frozen=True)
class Launch:
    world_size: int
    local_world_size: int
    cuda: bool

    @classmethod
    def from_env(cls) -> "Launch":
        cuda = torch.cuda.is_available()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() if cuda else 1) or 1)
        return cls(int(os.environ.get("WORLD_SIZE", local)), local, cuda)


Check = Callable[[Any, Launch], Iterator[str]]
CHECKS: list[Check] = []


def check_fn(fn: Check) -> Check:
    CHECKS.append(fn)
    return fn


def check(job_config: Any, launch: Launch | None = None) -> list[str]:
    """All problems of ``job_config`` (empty list: ready to train)."""
    launch = launch or Launch.from_env()
    problems: list[str] = []
    for fn in CHECKS:
        try:
            problems.extend(fn(job_config, launch))
        except ConfigError as exc:
            problems.append(str(exc))
        except Exception as exc:  # a check must never crash the report
            problems.append(f"preflight {fn.__name__} could not run: {type(exc).__name__}: {exc}")
    return list(dict.fromkeys(problems))  # checks that share a resolver (e.g. [data]) raise the same line


# -- field types -------------------------------------------------------------------

def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp)


@check_fn
def field_types(cfg: Any, launch: Launch) -> Iterator[str]:
    """Every config value has its declared type (TOML values are not type-checked by torchtitan)."""
    for section in dataclasses.fields(cfg):
        yield from _section_types(getattr(cfg, section.name), section.name)


def _section_types(obj: Any, path: str) -> Iterator[str]:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints.get(f.name, Any)
        if dataclasses.is_dataclass(value):
            yield from _section_types(value, f"{path}.{f.name}")
        elif not _type_ok(value, tp):
            section, _, key = f"{path}.{f.name}".partition(".")
            yield f"[{section}] {key} = {value!r}: expected {_describe(tp)}"


# -- model and tokenizer -------------------------------------------------------------

def _spec(cfg: Any):
    from torchtitan.protocols.train_spec import get_train_spec

    return get_train_spec(cfg.model.name)


@check_fn
def model_and_tokenizer(cfg: Any, launch: Launch) -> Iterator[str]:
    try:
        spec = _spec(cfg)
    except (ValueError, ModuleNotFoundError):
        yield f"[model] name = {cfg.model.name!r} is not a registered train spec; use e.g. \"ext_llama3\""
        return
    if cfg.model.flavor not in spec.model_args:
        yield (f"[model] flavor = {cfg.model.flavor!r} is not a flavor of {cfg.model.name!r}; "
               f"use one of {sorted(spec.model_args)[:12]}")
        return
    path = cfg.model.hf_assets_path
    if not os.path.isdir(path):
        yield f"[model] hf_assets_path {path!r} is not a folder; point it at the tokenizer/model files"
        return
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        yield f"[model] hf_assets_path {path!r} has no tokenizer.json; add the tokenizer files"
        return
    try:
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(os.path.join(path, "tokenizer.json")).get_vocab_size()
    except Exception as exc:
        yield f"[model] hf_assets_path: tokenizer.json cannot be loaded ({str(exc).splitlines()[0][:120]}); replace it"
        return
    model_vocab = getattr(spec.model_args[cfg.model.flavor], "vocab_size", None)
    if model_vocab is not None and vocab > model_vocab:
        yield (f"[model] the tokenizer has {vocab} tokens but flavor {cfg.model.flavor!r} has "
               f"vocab_size {model_vocab}; use a flavor whose vocabulary fits the tokenizer")


# -- data ---------------------------------------------------------------------------------

@check_fn
def data_sources(cfg: Any, launch: Launch) -> Iterator[str]:
    from ext.data.config import looks_like_hub_id, resolve_sources
    from ext.data.sources import plan_source

    datasets = cfg.data.datasets if isinstance(cfg.data.datasets, list) else []
    missing = [(i, loc) for i, loc in enumerate(datasets)
               if isinstance(loc, str) and not os.path.exists(loc) and not looks_like_hub_id(loc)]
    for i, location in missing:  # all of them (resolve_sources stops at the first), in its words
        yield (f"[data] datasets[{i}] {location!r} does not exist; give a local file or "
               "folder (relative to where you launch) or a Hub id like 'org/name'")
    if missing:
        return
    specs = resolve_sources(cfg.data)
    if not specs:
        from torchtitan.hf_datasets.text_datasets import DATASETS

        if cfg.training.dataset not in DATASETS:
            yield (f"[training] dataset = {cfg.training.dataset!r} is not one of torchtitan's "
                   f"{sorted(DATASETS)}; or set [data] datasets")
        elif cfg.training.dataset_path and not os.path.exists(cfg.training.dataset_path):
            yield f"[training] dataset_path {cfg.training.dataset_path!r} does not exist"
        return
    for spec in specs:
        unreadable = [f for f in spec.files if not os.access(f, os.R_OK)]
        if unreadable:
            yield f"[data] source {spec.name!r}: {unreadable[0]} is not readable; fix its permissions"
            continue
        if spec.kind == "hub":  # cached, or the Hub reachable; its records are checked when loading
            from ext.core.offline import hub_problem

            problem = hub_problem(spec.name, spec.location)
            if problem:
                yield problem
            continue
        if not plan_source(spec).has_records():
            yield f"[data] source {spec.name!r} ({spec.location}) has no records; fill it or remove it"


@check_fn
def sft_template(cfg: Any, launch: Launch) -> Iterator[str]:
    sft = getattr(cfg, "sft", None)
    if sft is None or not sft.enable:
        return
    if not cfg.data.datasets:
        yield "[sft] enable = true needs chat sources in [data] datasets"
        return
    if sft.template_file and not os.path.isfile(sft.template_file):
        yield f"[sft] template_file {sft.template_file!r} does not exist"
        return
    if os.path.isfile(os.path.join(cfg.model.hf_assets_path, "tokenizer.json")):
        from ext.data.encoders import load_chat_tokenizer

        load_chat_tokenizer(cfg.model.hf_assets_path, sft.template_file)


# -- output ---------------------------------------------------------------------------------

def _unwritable(folder: str) -> str | None:
    """Why ``folder`` (which may not exist yet) cannot be created and written, or None.

    Judged by creating and removing a file in the nearest existing folder:
    permission bits say nothing when running as root (containers usually
    do), and read-only mounts or pseudo file systems (``/proc``) only show
    themselves on a write.
    """
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".ext-write-test-", dir=probe)
    except OSError as e:
        return f"cannot write in {probe} ({e.strerror or e})"
    os.close(fd)
    os.remove(name)
    return None


@check_fn
def output_folder(cfg: Any, launch: Launch) -> Iterator[str]:
    why = _unwritable(cfg.job.dump_folder)
    if why:
        yield f"[job] dump_folder {cfg.job.dump_folder!r}: {why}; choose another path"
        return
    ckpt = cfg.checkpoint
    if ckpt.enable:
        folder = os.path.join(cfg.job.dump_folder, ckpt.folder)
        why = _unwritable(folder)
        if why:
            yield f"[checkpoint] folder {folder!r}: {why}; choose another [checkpoint] folder or [job] dump_folder"
    if ckpt.initial_load_path and not os.path.exists(ckpt.initial_load_path):
        yield f"[checkpoint] initial_load_path {ckpt.initial_load_path!r} does not exist"


# -- shapes and parallelism -------------------------------------------------------------------

@check_fn
def sizes_and_layout(cfg: Any, launch: Launch) -> Iterator[str]:
    t, p = cfg.training, cfg.parallelism
    for key, value in (("seq_len", t.seq_len), ("local_batch_size", t.local_batch_size), ("steps", t.steps)):
        if isinstance(value, int) and value < 1:
            yield f"[training] {key} = {value}: must be >= 1"
    degrees = {
        "tensor_parallel_degree": p.tensor_parallel_degree,
        "pipeline_parallel_degree": p.pipeline_parallel_degree,
        "context_parallel_degree": p.context_parallel_degree,
        "data_parallel_replicate_degree": p.data_parallel_replicate_degree,
    }
    if any(not isinstance(v, int) for v in degrees.values()):
        return
    for key, value in degrees.items():
        if value < 1:
            yield f"[parallelism] {key} = {value}: must be >= 1"
            return
    shard = p.data_parallel_shard_degree
    others = p.tensor_parallel_degree * p.pipeline_parallel_degree * p.context_parallel_degree
    if shard == -1:
        if launch.world_size % (others * p.data_parallel_replicate_degree):
            yield (f"[parallelism] tp x pp x cp x dp_replicate = {others * p.data_parallel_replicate_degree} "
                   f"does not divide the {launch.world_size} processes; change the degrees or the process count")
            return
        shard = launch.world_size // (others * p.data_parallel_replicate_degree)
    elif shard < 1:
        yield f"[parallelism] data_parallel_shard_degree = {shard}: use -1 (all remaining) or >= 1"
        return
    product = shard * others * p.data_parallel_replicate_degree
    if product != launch.world_size:
        yield (f"[parallelism] the degrees multiply to {product} but {launch.world_size} process(es) run; "
               "make dp_replicate x dp_shard x tp x pp x cp equal the process count (NGPU/NPROC x NNODES)")
        return
    dp = shard * p.data_parallel_replicate_degree
    if isinstance(t.global_batch_size, int) and t.global_batch_size > 0 and t.local_batch_size > 0:
        if t.global_batch_size % (t.local_batch_size * dp):
            yield (f"[training] global_batch_size = {t.global_batch_size} is not a multiple of "
                   f"local_batch_size x data-parallel degree = {t.local_batch_size} x {dp}")
    divisor = p.tensor_parallel_degree * 2 * p.context_parallel_degree if p.context_parallel_degree > 1 \
        else p.tensor_parallel_degree
    if t.seq_len % divisor:
        yield f"[training] seq_len = {t.seq_len} must be divisible by {divisor} (tp x 2 cp)"


@check_fn
def memory_fits(cfg: Any, launch: Launch) -> Iterator[str]:
    """The estimate of :mod:`ext.training.memory` against the device's memory (RAM per process on CPU)."""
    from ext.training.memory import GiB, estimate

    est = estimate(cfg, launch.world_size, launch.local_world_size, launch.cuda)
    if est is None or not est.device_bytes or est.total_bytes <= est.device_bytes:
        return
    yield (f"[training] about {est.total_bytes / GiB:,.1f} GiB per process needed but the {est.device} has "
           f"{est.device_bytes / GiB:.1f} GiB (parameters+gradients+optimizer {est.states_bytes / GiB:,.1f}, "
           f"activations {est.activations_bytes / GiB:,.1f}, logits {est.logits_bytes / GiB:,.1f} GiB at "
           f"seq_len {cfg.training.seq_len} x local_batch_size {cfg.training.local_batch_size}); lower them, "
           "set [activation_checkpoint] mode = \"full\", or shard over more processes "
           "(EXT_SKIP_PREFLIGHT=1 starts anyway)")


# -- MoE ----------------------------------------------------------------------------------------

@check_fn
def moe_settings(cfg: Any, launch: Launch) -> Iterator[str]:
    """``[moe]`` values, and a ``last_save_in_hf`` that could not hold routing biases."""
    from ext.model.moe import moe_args_from_config

    try:
        args = _spec(cfg).model_args.get(cfg.model.flavor)
    except (ValueError, ModuleNotFoundError):
        return  # reported by model_and_tokenizer
    if args is not None and getattr(args, "moe_enabled", False):
        try:
            moe_args_from_config(args.moe_args, cfg)
        except ConfigError as exc:
            yield str(exc)


# -- attention ----------------------------------------------------------------------------------

@check_fn
def attention_settings(cfg: Any, launch: Launch) -> Iterator[str]:
    from ext.data.skyladder import masking_requested, validate_skyladder
    from ext.model.attention import resolve_backend

    sky = cfg.skyladder
    if sky.enable and not cfg.data.datasets:
        yield "[skyladder] enable = true needs the [data] loader (segments); set [data] datasets"
    validate_skyladder(sky, cfg.training.seq_len, cfg.training.steps)
    backend = resolve_backend(cfg.attention, masking_requested(cfg), launch.cuda)
    p = cfg.parallelism
    if backend != "none" and p.context_parallel_degree > 1:
        yield ("[parallelism] context_parallel_degree > 1 is not supported with segment masks; "
               "set [attention] document_masking = false and [skyladder] enable = false, or cp = 1")
    if backend == "dense" and p.pipeline_parallel_degree > 1:
        yield "[attention] backend \"dense\" does not work with pipeline parallelism; use \"flex\" or \"varlen\""


@check_fn
def lr_schedule(cfg: Any, launch: Launch) -> Iterator[str]:
    from ext.training.scheduler import resolve_schedule

    if cfg.optimizer.lr <= 0:
        yield f"[optimizer] lr = {cfg.optimizer.lr}: must be > 0"
        return
    resolve_schedule(cfg.lr_scheduler, cfg.training.steps, cfg.optimizer.lr)


# Checks that live with the component they check, after the ones above.
from ext.training.eval import eval_settings  # noqa: E402
from ext.training.flops import peak_setting  # noqa: E402

CHECKS += [eval_settings, peak_setting]
