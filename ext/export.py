"""DCP checkpoint -> Hugging Face folder: ``python -m ext.cli dcp-to-hf``.

::

    python -m ext.cli dcp-to-hf --checkpoint outputs/x/checkpoint/step-1000 --out hf/x \\
        --job.config_file train_configs/x.toml [--max-shard-size 5GB] [--dtype bfloat16] [--overwrite] \\
        [--allow-routing-drift]

writes ``model-0000i-of-0000n.safetensors`` shards (at most ``--max-shard-size``
each, except a single tensor larger than that, which gets a shard of its own),
``model.safetensors.index.json``, ``config.json``, ``generation_config.json``
and the tokenizer files, so that
``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads the model.

How:

- The model comes from the training config (``[model] name``/``flavor``; the
  trainer's ``update_from_config`` is applied). Without any config option it
  is identified from the checkpoint: the registered flavor whose model
  tensors are exactly the checkpoint's (same names, same shapes; the
  optimizer, scheduler, loader and train state entries aside), so dense
  Qwen3 (q/k norms) is never taken for Llama; a tied and an untied flavor
  with the same shapes are told apart by comparing the two tensors.
- Weights are read with DCP on the CPU without a process group, so a
  checkpoint written by any number of ranks (FSDP shards, any layout) loads
  as full tensors. Only the model's keys are read (not the optimizer), one
  transformer block at a time, so memory stays about one block plus one
  output shard.
- Names and layouts are converted by the train spec's ``state_dict_adapter``
  (``to_hf``), called per block, so any adapter whose keys are per block
  works (torchtitan's Llama-3 with its wq/wk RoPE permutation, Qwen3 with
  MoE experts split into one tensor each). With tied embeddings the head is
  written once (``model.embed_tokens.weight``; ``tie_word_embeddings`` is
  true): ``to_hf`` leaves ``lm_head.weight`` out, the one place that drops it
  for this command and for ``last_save_in_hf`` alike.
  MoE routing biases (``moe.expert_bias``, trained by ``[moe]
  load_balance_coeff``) have no HF counterpart: when any is nonzero the
  export is refused (exit 2) before anything is written, since the HF model
  would pick other experts for some tokens and give other logits;
  ``--allow-routing-drift`` (or ``[moe] allow_routing_drift`` in the given
  config) writes it anyway, without the biases, with a warning. Models
  balanced by ``[moe] aux_loss_coeff`` (the default) have no biases and
  export exactly.
- The safetensors and the index are written by
  :func:`ext.model.hf.save_hf_weights`: huggingface_hub's
  ``split_torch_state_dict_into_shards`` plans the shards from the converted
  names, shapes and dtypes (every block is first converted on the meta
  device), so the split and the index are the hub's (and transformers') for
  the same tensors, and each shard is written as soon as its last tensor has
  been read. One difference from the hub: a single shard is named
  ``model-00001-of-00001.safetensors`` and has an index too, as torch's
  writer names it for ``last_save_in_hf``. The folder is then checked and
  completed by :func:`ext.model.hf.complete_hf_folder`, as a
  ``last_save_in_hf`` folder is. ``--max-shard-size`` reads KB..TB as powers
  of 10, as the hub and transformers do, and also KiB..TiB and plain bytes.
- ``config.json`` comes from :func:`ext.model.hf.hf_config_for`
  (``max_position_embeddings`` is the flavor's released context, not
  ``training.seq_len``); token ids and
  the tokenizer files from ``[model] hf_assets_path`` (or ``--tokenizer``).
  ``generation_config.json`` stops on EOS and on the chat template's
  end-of-turn token (``<|im_end|>``, ``<|eot_id|>``) when it has one.
- The output is written to a temporary folder next to ``--out`` and renamed
  at the end: an interrupted export leaves no half-written folder. A
  non-empty ``--out`` is refused unless ``--overwrite``.
- A progress bar (tqdm, on stderr) is shown for checkpoints of 256 MiB or more.

``--dtype`` defaults to float32 (lossless for fp32 training weights);
``bfloat16`` halves the size.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import warnings
from typing import Any

from ext.core.errors import ConfigError
from ext.model import hf

DTYPES = ("float32", "bfloat16")
PROGRESS_MIN_BYTES = 256 * 2**20
_LAYER = re.compile(r"layers\.(\d+)\.")


def parse_size(text: str) -> int:
    """``--max-shard-size`` in bytes (:func:`ext.model.hf.parse_size`: 5GB is
    10^9 bytes as transformers reads it, 2GiB 2^30, 123 bytes); ConfigError otherwise."""
    try:
        return hf.parse_size(text)
    except ValueError as exc:
        raise ConfigError(f"--max-shard-size {exc}") from None


# ------------------------------------------------------------------ checkpoint


def resolve_checkpoint(path: str) -> str:
    """A committed DCP step folder: ``path`` itself, or the newest one under it."""
    from ext.training.checkpoint import DCP_COMMIT, HF_COMMIT, checkpoint_kind, step_folders

    if not os.path.isdir(path):
        raise ConfigError(f"--checkpoint {path} is not a folder; give a step-N checkpoint folder")
    if os.path.isfile(os.path.join(path, DCP_COMMIT)):
        return path
    if os.path.isfile(os.path.join(path, HF_COMMIT)):
        raise ConfigError(f"--checkpoint {path} is already in Hugging Face format (model.safetensors.index.json)")
    steps = step_folders(path)
    for step in sorted(steps, reverse=True):
        if checkpoint_kind(steps[step]) in ("full", "model"):
            return steps[step]
    if steps:
        raise ConfigError(f"--checkpoint {path}: no step folder under it holds a complete DCP checkpoint")
    raise ConfigError(
        f"--checkpoint {path} has no {DCP_COMMIT} (not a complete DCP checkpoint: an interrupted save?)"
    )


def _meta_model(spec: Any, model_args: Any) -> Any:
    import torch

    with torch.device("meta"):
        return spec.model_cls(model_args)


def _param_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}


def _tensor_meta(checkpoint: str) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    return {k: v for k, v in md.items() if isinstance(v, TensorStorageMetadata)}


def _load(checkpoint: str, meta: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """Full CPU tensors for ``keys`` (any saved sharding), read without a process group."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    state = {k: torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype) for k in keys}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=FileSystemReader(checkpoint), no_dist=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        from ext.training.checkpoint import _cause

        raise ConfigError(f"--checkpoint {checkpoint} could not be read ({_cause(exc)})") from None
    return state


_TRAINER_STATES = ("optimizer", "lr_scheduler", "dataloader", "train_state")


def _model_tensors(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The model's entries of a checkpoint (or model) state: names and shapes,
    without the trainer's states and the optional MoE routing biases."""
    return {k: s for k, s in shapes.items()
            if k.split(".", 1)[0] not in _TRAINER_STATES and not k.endswith("expert_bias")}


def identify_model(checkpoint: str, meta: dict[str, Any]) -> tuple[str, str, Any]:
    """``(spec name, flavor, model args)`` of the one registered flavor whose
    model tensors are exactly the checkpoint's (the same names, none missing
    and none extra, with the same shapes; routing biases aside); ConfigError
    when none or several."""
    import copy

    import torch
    from torchtitan.protocols.train_spec import _extra_train_specs

    from ext.model.hf import hf_config_for

    shapes = {k: tuple(v.size) for k, v in meta.items()}
    embed = shapes.get("tok_embeddings.weight")
    n_layers = len({m.group(1) for k in shapes if (m := _LAYER.match(k))})
    found = []
    for name, spec in _extra_train_specs.items():
        for flavor, args in spec.model_args.items():
            if embed and (getattr(args, "vocab_size", None), getattr(args, "dim", None)) != embed:
                continue
            if getattr(args, "n_layers", n_layers) != n_layers:
                continue
            params = _param_shapes(_meta_model(spec, args))
            if _model_tensors(params) == _model_tensors(shapes):
                found.append((name, flavor, copy.deepcopy(args)))
    by_config: dict[str, tuple[str, str, Any]] = {}
    for name, flavor, args in found:
        try:
            key = hf_config_for(name, args).to_json_string()
        except ConfigError:
            continue
        by_config.setdefault(key, (name, flavor, args))
    candidates = list(by_config.values())
    if len(candidates) > 1 and {"tok_embeddings.weight", "output.weight"} <= shapes.keys():
        tensors = _load(checkpoint, meta, ["tok_embeddings.weight", "output.weight"])
        tied = torch.equal(tensors["tok_embeddings.weight"], tensors["output.weight"])
        candidates = [c for c in candidates if bool(getattr(c[2], "enable_weight_tying", False)) == tied]
    if len(candidates) == 1:
        return candidates[0]
    names = ", ".join(f"{n} {f}" for n, f, _ in candidates) or "none"
    raise ConfigError(
        f"cannot tell the model of {checkpoint} from its tensors (matching flavors: {names}); "
        "pass the training config: --job.config_file TOML"
    )


def routing_biases(checkpoint: str, meta: dict[str, Any] | None = None) -> dict[str, float]:
    """``{key: max |bias|}`` of the checkpoint's nonzero MoE routing biases
    (``*.moe.expert_bias``); empty when there are none or all are zero."""
    meta = _tensor_meta(checkpoint) if meta is None else meta
    keys = [k for k in meta if k.endswith("expert_bias")]
    if not keys:
        return {}
    tensors = _load(checkpoint, meta, keys)
    return {k: float(v.abs().max()) for k, v in tensors.items() if v.any()}


def _groups(keys: list[str]) -> list[list[str]]:
    """Model keys in conversion units: what precedes the blocks, each block, the rest."""
    head, blocks, tail = [], {}, []
    for key in keys:
        match = _LAYER.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), []).append(key)
        elif not blocks:
            head.append(key)
        else:
            tail.append(key)
    return [g for g in [head, *(blocks[i] for i in sorted(blocks)), tail] if g]


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} is a file; give a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ConfigError(f"--out {out} is not empty; pass --overwrite to replace it")


def _publish(tmp: str, out: str) -> None:
    """Move the finished ``tmp`` folder to ``out``, replacing what is there."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
    if not os.path.exists(out):
        os.rename(tmp, out)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
    os.rmdir(old)
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def dcp_to_hf(
    checkpoint: str,
    out: str,
    *,
    model_name: str,
    model_args: Any,
    tokenizer_dir: str | None,
    dtype: str = "float32",
    max_shard_size: int = 5 * 10**9,
    overwrite: bool = False,
    progress: bool | None = None,
    allow_routing_drift: bool = False,
) -> dict[str, Any]:
    """Convert one DCP checkpoint folder to a Hugging Face folder ``out`` (module doc).

    ``dtype`` applies to floating-point tensors. ``progress``: None shows a bar
    for checkpoints of :data:`PROGRESS_MIN_BYTES` or more. Returns a summary
    (tensors, bytes, shards, tokenizer files, ``biased_layers``). Raises
    ConfigError, before anything is written, for a checkpoint that does not
    match the model, an ``out`` it may not replace, or nonzero MoE routing
    biases (which HF cannot hold) unless ``allow_routing_drift``.
    """
    import torch
    from torchtitan.protocols.train_spec import get_train_spec
    from tqdm import tqdm

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    out = os.path.abspath(out)
    _check_out(out, overwrite)
    spec = get_train_spec(model_name)
    if spec.state_dict_adapter is None:
        raise ConfigError(f"[model] name = {model_name!r} has no state_dict_adapter; it cannot be exported")
    meta = _tensor_meta(checkpoint)
    biased = routing_biases(checkpoint, meta)
    if biased and not allow_routing_drift:
        raise ConfigError(
            f"{checkpoint}: {len(biased)} MoE layer(s) have nonzero routing biases (moe.expert_bias, "
            f"max |bias| {max(biased.values()):.3g}, from [moe] load_balance_coeff), which Hugging Face's "
            "Qwen3-MoE cannot hold: the export would route differently; retrain with [moe] aux_loss_coeff, "
            "or pass --allow-routing-drift to write it anyway"
        )
    model = _meta_model(spec, model_args)
    wanted = _param_shapes(model)
    params = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    keys = []
    for key, shape in wanted.items():
        if key not in meta:
            if key in params:
                raise ConfigError(
                    f"{checkpoint} has no {key!r}: it is not a checkpoint of the configured "
                    f"[model] {model_name}; pass the config it was trained with"
                )
            continue  # a buffer the checkpoint does not keep
        if tuple(meta[key].size) != shape:
            raise ConfigError(
                f"{checkpoint}: {key} has shape {tuple(meta[key].size)} but the configured "
                f"[model] {model_name} expects {shape}; pass the config it was trained with"
            )
        keys.append(key)
    adapter = spec.state_dict_adapter(model_args, None)  # to_hf leaves a tied head out
    torch_dtype = getattr(torch, dtype)

    def as_written(hf_state: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in hf_state.items()}

    def nbytes(group: list[str]) -> int:
        return sum(meta[k].size.numel() * meta[k].properties.dtype.itemsize for k in group)

    groups = _groups(keys)
    layout: dict[str, Any] = {}  # every HF tensor, in writing order, converted on the meta device
    for group in groups:
        layout.update(hf.meta_layout(as_written(adapter.to_hf({
            k: torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype, device="meta") for k in group
        }))))
    total = nbytes(keys)

    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        show = progress if progress is not None else total >= PROGRESS_MIN_BYTES
        with tqdm(total=total, unit="B", unit_scale=True, desc="dcp-to-hf", disable=not show,
                  file=sys.stderr, mininterval=1.0) as bar:

            def converted():  # one conversion unit (a transformer block) in memory at a time
                for group in groups:
                    yield as_written(adapter.to_hf(_load(checkpoint, meta, group)))
                    bar.update(nbytes(group))

            plan = hf.save_hf_weights(tmp, converted(), layout=layout, max_shard_size=max_shard_size)
        copied = hf.complete_hf_folder(tmp, model_args, dtype=dtype, tokenizer_dir=tokenizer_dir,
                                       model_name=model_name, layout=layout)
        _check_out(out, overwrite)  # still allowed after the conversion
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if biased:
        print(
            f"warning: --allow-routing-drift: {len(biased)} MoE layer(s) have nonzero routing biases "
            f"(moe.expert_bias, max |bias| {max(biased.values()):.3g}); the export routes without them "
            "and picks other experts for some tokens", file=sys.stderr,
        )
    return {"tensors": len(plan.tensor_to_filename), "bytes": plan.metadata["total_size"],
            "shards": len(plan.filename_to_tensors),
            "tokenizer_files": copied, "out": out, "biased_layers": len(biased)}


# ------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m ext.cli dcp-to-hf`` (config options are extra)."""
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a step-N DCP folder, or a checkpoint folder (its newest complete step)")
    parser.add_argument("--out", required=True, metavar="DIR", help="Hugging Face folder to write")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="largest safetensors file, e.g. 5GB (10^9 bytes) or 2GiB (default 5GB)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="dtype of floating-point weights (default float32)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="tokenizer files to copy (default: [model] hf_assets_path of the config)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--allow-routing-drift", action="store_true",
                        help="export although MoE routing biases (moe.expert_bias) are nonzero; HF has none, "
                             "so the export then routes some tokens to other experts")


def run(args: argparse.Namespace, job_config: Any | None) -> int:
    """Run the command; ``job_config`` is the training config, or None when no
    config option was given (the model is then identified from the checkpoint)."""
    import copy

    import ext.job_config  # noqa: F401  (registers our train specs)
    from torchtitan.protocols.train_spec import get_train_spec

    max_shard_size = parse_size(args.max_shard_size)
    _check_out(os.path.abspath(args.out), args.overwrite)
    checkpoint = resolve_checkpoint(args.checkpoint)
    tokenizer_dir = args.tokenizer
    allow_drift = bool(args.allow_routing_drift)
    if job_config is None:
        name, flavor, model_args = identify_model(checkpoint, _tensor_meta(checkpoint))
        how = "identified from its tensors"
    else:
        name, flavor = job_config.model.name, job_config.model.flavor
        spec = get_train_spec(name)
        if flavor not in spec.model_args:
            raise ConfigError(f"[model] flavor {flavor!r} is not one of {name}'s: {sorted(spec.model_args)}")
        model_args = copy.deepcopy(spec.model_args[flavor])
        model_args.update_from_config(job_config)
        if tokenizer_dir is None:
            tokenizer_dir = job_config.model.hf_assets_path
        allow_drift = allow_drift or bool(getattr(getattr(job_config, "moe", None), "allow_routing_drift", False))
        how = "from the config"
    print(f"dcp-to-hf: {checkpoint} ({name} {flavor}, {how}) -> {args.out}", flush=True)
    summary = dcp_to_hf(
        checkpoint, args.out, model_name=name, model_args=model_args, tokenizer_dir=tokenizer_dir,
        dtype=args.dtype, max_shard_size=max_shard_size, overwrite=args.overwrite,
        allow_routing_drift=allow_drift,
    )
    tokenizer = (f"tokenizer: {', '.join(summary['tokenizer_files'])}" if summary["tokenizer_files"]
                 else "no tokenizer files (pass --tokenizer DIR or a config with [model] hf_assets_path)")
    print(
        f"wrote {summary['tensors']} tensors, {summary['bytes'] / 1e6:,.1f} MB {args.dtype} in "
        f"{summary['shards']} shard(s) + model.safetensors.index.json, config.json, "
        f"generation_config.json; {tokenizer}: {summary['out']}"
    )
    return 0
