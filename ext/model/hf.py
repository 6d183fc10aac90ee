"""Hugging Face interop for our train specs: configs, state-dict adapters, loading.

For code that moves weights in or out of the Hub format (the export CLI,
tests, notebooks):

- :func:`hf_config_for` gives the ``transformers`` config of a flavor
  (``LlamaConfig``, ``Qwen3Config`` or ``Qwen3MoeConfig``), so that
  ``AutoModelForCausalLM.from_config`` builds the same network;
- :func:`state_dict_adapter_for` gives the train spec's
  ``StateDictAdapter`` class (``adapter_cls(model_args, hf_assets_path)``;
  ``to_hf(state_dict)`` / ``from_hf(hf_state_dict)``), the one torchtitan
  uses for ``[checkpoint] initial_load_in_hf`` and ``last_save_in_hf``;
- :func:`load_hf_weights` loads a folder of ``*.safetensors`` in HF names
  into one of our models;
- :func:`save_hf_weights` is the one HF writer (shards planned by
  huggingface_hub's ``split_torch_state_dict_into_shards``, the index, one
  shard in memory at a time), and :func:`complete_hf_folder` checks a folder's
  index against the model and writes config.json, generation_config.json and
  the tokenizer files; ``dcp-to-hf`` uses both, a ``last_save_in_hf`` save
  the second (see "weights" below).

Adapters: Llama-3 is torchtitan's ``Llama3StateDictAdapter`` (which permutes
wq/wk between torchtitan's interleaved RoPE and HF's rotate-half layout)
extended by :class:`Llama3HFAdapter` for tying; Qwen3 is torchtitan's
``Qwen3StateDictAdapter`` unchanged (it already handles tying, and splits or
stacks the MoE experts: HF keeps one tensor per expert,
``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``). With tying,
``to_hf`` leaves ``lm_head.weight`` out and ``from_hf`` fills the head from
``model.embed_tokens.weight`` when the checkpoint has no head. MoE routing
biases (``moe.expert_bias``, ``[moe] load_balance_coeff``) have no HF
counterpart: they are not exported (the export refuses nonzero ones unless
told to drift), and stay 0 when importing.
"""

import functools
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter

from ext.core.errors import ConfigError
from ext.model.tying import is_tied

_FAMILY = {"ext_llama3": "llama", "llama3": "llama", "ext_qwen3": "qwen3", "qwen3": "qwen3"}
LLAMA3_CONTEXT = 131072  # max_position_embeddings of Llama-3.1 and 3.2


class Llama3HFAdapter(Llama3StateDictAdapter):
    """torchtitan's Llama-3 adapter that writes a tied head once and reads it back."""

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if is_tied(self.model_args):
            state_dict = {k: v for k, v in state_dict.items() if k != "output.weight"}
        return super().to_hf(state_dict)

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        if is_tied(self.model_args) and "lm_head.weight" not in hf_state_dict:
            hf_state_dict = {**hf_state_dict, "lm_head.weight": hf_state_dict["model.embed_tokens.weight"]}
        return super().from_hf(hf_state_dict)


def _family(model_name: str) -> str:
    if model_name not in _FAMILY:
        raise ConfigError(
            f"[model] name = {model_name!r} has no Hugging Face mapping; use one of {sorted(_FAMILY)}"
        )
    return _FAMILY[model_name]


@functools.lru_cache(maxsize=None)
def llama_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU width of torchtitan's Llama for ``dim``: asked of its
    ``FeedForward`` (on the meta device) rather than restated, so that the
    export and the FLOPs count follow torchtitan if its rule changes."""
    from torchtitan.models.llama3.model.model import FeedForward

    with torch.device("meta"):
        ffn = FeedForward(dim, 4 * dim, multiple_of, ffn_dim_multiplier)
    return ffn.w1.out_features


def _llama_config(args: Any, common: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    scaling = args.rope_scaling_args
    rope_scaling = None
    if scaling.scaling_factor != 1.0:  # torchtitan always applies Llama-3.1 scaling; 1.0 is none
        # HF expects the context to exceed the original one; Llama-3.1/3.2 declare 131072.
        common = {**common, "max_position_embeddings": max(common["max_position_embeddings"], LLAMA3_CONTEXT)}
        rope_scaling = {
            "rope_type": "llama3",
            "factor": float(scaling.scaling_factor),
            "low_freq_factor": float(scaling.low_freq_factor),
            "high_freq_factor": float(scaling.high_freq_factor),
            "original_max_position_embeddings": int(scaling.original_max_position_embeddings),
        }
    return LlamaConfig(
        **common,
        intermediate_size=llama_ffn_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier),
        num_key_value_heads=args.n_kv_heads or args.n_heads,
        head_dim=args.dim // args.n_heads,
        rope_scaling=rope_scaling,
        mlp_bias=False,
        architectures=["LlamaForCausalLM"],
    )


def _qwen3_config(args: Any, common: dict[str, Any]) -> Any:
    if not args.qk_norm:
        raise ConfigError("Qwen3 flavors without qk_norm have no Hugging Face Qwen3 counterpart; set qk_norm = true")
    common = {
        **common,
        "intermediate_size": args.hidden_dim,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "use_sliding_window": False,
    }
    if not args.moe_enabled:
        from transformers import Qwen3Config

        return Qwen3Config(**common, architectures=["Qwen3ForCausalLM"])
    from transformers import Qwen3MoeConfig

    moe = args.moe_args
    expected = {
        "num_shared_experts": 0, "score_func": "softmax", "gate_bias": False,
        "num_expert_groups": None, "route_scale": 1.0, "score_before_experts": False,
    }
    for key, value in expected.items():
        if getattr(moe, key) != value:
            raise ConfigError(
                f"MoE flavor has moe_args.{key} = {getattr(moe, key)!r}, which Qwen3-MoE cannot express; "
                f"set it to {value!r} to export"
            )
    return Qwen3MoeConfig(
        **common,
        moe_intermediate_size=args.moe_inter_dim,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        norm_topk_prob=moe.route_norm,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        architectures=["Qwen3MoeForCausalLM"],
    )


def hf_config_for(model_name: str, model_args: Any, **overrides: Any) -> Any:
    """The ``transformers`` config that builds the same network as ``model_args``.

    ``model_name`` is the train spec (``"ext_llama3"``, ``"ext_qwen3"``, or
    torchtitan's ``"llama3"``/``"qwen3"``). ``max_position_embeddings`` is the
    flavor's ``context_length``, the released model's context (Qwen3 and
    Qwen3-MoE 40960, Llama-3.1/3.2 131072, SmolLM2 8192; tiny flavors their
    defined ``max_seq_len``: Qwen3 4096, Llama 131072), or the trained
    ``max_seq_len`` when that is longer; never ``training.seq_len`` alone,
    since servers take their context limit from it. It is at least 131072
    with Llama-3 RoPE scaling, whose HF form requires more than the
    original 8192 (no weight depends on it). Token ids are not part
    of the model args: pass ``bos_token_id=``, ``eos_token_id=`` (and e.g.
    ``dtype="bfloat16"``) in ``overrides``, which are set last. Raises
    ConfigError for a name or a setting HF cannot express.
    """
    common = dict(
        vocab_size=model_args.vocab_size,
        hidden_size=model_args.dim,
        num_hidden_layers=model_args.n_layers,
        num_attention_heads=model_args.n_heads,
        hidden_act="silu",
        max_position_embeddings=max(getattr(model_args, "context_length", 0) or 0, model_args.max_seq_len),
        rms_norm_eps=model_args.norm_eps,
        rope_theta=float(model_args.rope_theta),
        tie_word_embeddings=is_tied(model_args),
        attention_bias=False,
        bos_token_id=None,
        eos_token_id=None,
    )
    if _family(model_name) == "llama":
        config = _llama_config(model_args, common)
    else:
        config = _qwen3_config(model_args, common)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def state_dict_adapter_for(model_name: str) -> type:
    """The state-dict adapter class of one of our train specs (the one its
    train spec registers), or of a train spec registered with torchtitan."""
    if model_name == "ext_llama3":
        return Llama3HFAdapter
    if model_name == "ext_qwen3":
        from torchtitan.models.qwen3.model.state_dict_adapter import Qwen3StateDictAdapter

        return Qwen3StateDictAdapter
    from torchtitan.protocols.train_spec import get_train_spec

    adapter = get_train_spec(model_name).state_dict_adapter
    if adapter is None:
        raise ConfigError(f"[model] name = {model_name!r} has no state-dict adapter")
    return adapter


def read_safetensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``folder/*.safetensors`` by name (CPU)."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def load_hf_weights(model: nn.Module, model_name: str, folder: str | Path) -> None:
    """Load HF-named safetensors from ``folder`` into ``model`` (unsharded, any device).

    Every model tensor must be filled except the MoE routing biases, which HF
    checkpoints do not have (they keep their current value, 0 after init).
    Raises ValueError naming the first missing or unexpected key.
    """
    adapter = state_dict_adapter_for(model_name)(model.model_args, None)
    state = adapter.from_hf(read_safetensors(folder))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("moe.expert_bias")]
    if missing or unexpected:
        raise ValueError(
            f"{folder} does not match {model_name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


# ------------------------------------------------------------------ metadata

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
    "chat_template.json",
)
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def _token_ids(tokenizer_dir: str | None) -> dict[str, Any]:
    """BOS/EOS/PAD ids of a tokenizer folder and the ids generation stops at."""
    if not tokenizer_dir or not any(
        os.path.isfile(os.path.join(tokenizer_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        return {}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    stops = [ids["eos_token_id"]] if ids["eos_token_id"] is not None else []
    for token in END_OF_TURN_TOKENS:
        token_id = tok.convert_tokens_to_ids(token)
        if token in template and isinstance(token_id, int) and token_id != tok.unk_token_id \
                and token_id not in stops:
            stops.append(token_id)
    ids["stop_ids"] = stops
    return ids


def write_hf_metadata(
    out: str,
    model_args: Any,
    *,
    dtype: Any,
    tokenizer_dir: str | None,
    model_name: str | None = None,
) -> list[str]:
    """Write ``config.json``, ``generation_config.json`` and the tokenizer files
    into ``out`` (which holds the safetensors). ``model_name`` is the train spec
    (None: ours for the class of ``model_args``). Returns the tokenizer files copied."""
    from transformers import GenerationConfig

    if model_name is None:
        model_name = _model_name_for_args(model_args)
    dtype_name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    ids = _token_ids(tokenizer_dir)
    config = hf_config_for(
        model_name, model_args, dtype=dtype_name,
        bos_token_id=ids.get("bos_token_id"), eos_token_id=ids.get("eos_token_id"),
        pad_token_id=ids.get("pad_token_id"),
    )
    config.save_pretrained(out)
    stops = ids.get("stop_ids") or []
    generation = GenerationConfig(
        bos_token_id=ids.get("bos_token_id"),
        eos_token_id=stops[0] if len(stops) == 1 else (stops or None),
        pad_token_id=ids.get("pad_token_id"),
    )
    generation.save_pretrained(out)
    copied = []
    for name in TOKENIZER_FILES:
        src = os.path.join(tokenizer_dir or "", name)
        if tokenizer_dir and os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out, name))
            copied.append(name)
    return copied


def _model_name_for_args(model_args: Any) -> str:
    from torchtitan.models.llama3 import TransformerModelArgs
    from torchtitan.models.qwen3.model.args import Qwen3ModelArgs

    if isinstance(model_args, Qwen3ModelArgs):
        return "ext_qwen3"
    if isinstance(model_args, TransformerModelArgs):
        return "ext_llama3"
    raise ConfigError(f"no Hugging Face mapping for model args {type(model_args).__name__}")


# ------------------------------------------------------------------ weights
#
# The one Hugging Face writer. Both kinds of HF folder this package makes end
# in the same completion step:
#
# - ``python -m ext.cli dcp-to-hf`` writes its shards with :func:`save_hf_weights`
#   (one transformer block read at a time) and completes the folder with
#   :func:`complete_hf_folder`;
# - a ``last_save_in_hf`` save keeps torchtitan's own weights writer, torch's
#   ``HuggingFaceStorageWriter``: every rank writes its part and the parts are
#   consolidated on disk, where gathering the model on one rank to write it
#   here would need the whole model in that rank's memory. Its folder is then
#   completed by :func:`complete_hf_folder` (rank 0), the single place that
#   checks the index against the model and writes config.json,
#   generation_config.json and the tokenizer files.
#
# The tied head is dropped in one place, the train spec's ``to_hf``
# (``Llama3HFAdapter``, torchtitan's ``Qwen3StateDictAdapter``), which both
# paths call; :func:`hf_layout_for` derives the expected tensors from the same
# ``to_hf``, so neither folder can hold ``lm_head.weight`` for a tied model.

HF_INDEX = "model.safetensors.index.json"
HF_WEIGHTS_PATTERN = "model{suffix}.safetensors"  # huggingface_hub's (and transformers') default
HF_ONE_SHARD = "model-00001-of-00001.safetensors"
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes in a shard size: ``"5GB"`` (10^9), ``"500MiB"`` (2^20), ``"123"`` (bytes).

    KB/MB/GB/TB (any case) are powers of 10, as huggingface_hub's
    ``split_torch_state_dict_into_shards`` and transformers read them (the
    hub's parser, which is not public, knows only these four units); KiB..TiB
    (powers of 2), B and plain byte counts are read too. Raises ValueError for
    anything else, and for zero.
    """
    match = _SIZE.fullmatch(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])


def own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` contiguous and alone in its storage (copied when it views a
    larger one, e.g. one expert split from the stacked experts): safetensors
    refuses tensors that share memory, and huggingface_hub's planner counts a
    view as its whole storage."""
    tensor = tensor.contiguous()
    whole = tensor.storage_offset() == 0 and \
        tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole else tensor.clone()


def meta_layout(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta tensors with the names, shapes and dtypes of ``tensors``, each in its own storage."""
    return {k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for k, v in tensors.items()}


def hf_layout_for(model_name: str, model_args: Any) -> dict[str, torch.Tensor]:
    """HF name -> meta tensor (shape; dtype as built) of every tensor an HF
    folder of this model holds: the model built on the meta device, converted
    by the train spec's ``to_hf``. A tied model has no ``lm_head.weight``."""
    from torchtitan.protocols.train_spec import get_train_spec

    with torch.device("meta"):
        model = get_train_spec(model_name).model_cls(model_args)
    adapter = state_dict_adapter_for(model_name)(model_args, None)
    return meta_layout(adapter.to_hf(model.state_dict()))


def plan_hf_shards(layout: Mapping[str, torch.Tensor], max_shard_size: int | str) -> Any:
    """huggingface_hub's ``split_torch_state_dict_into_shards`` of ``layout``
    (a ``StateDictSplit``: ``filename_to_tensors``, ``tensor_to_filename``,
    ``metadata["total_size"]``).

    Tensors fill shards in ``layout`` order; a tensor larger than
    ``max_shard_size`` gets a shard of its own. ``layout`` may hold meta
    tensors: only shapes and dtypes count, each tensor in its own storage. A
    string size is read by :func:`parse_size`. One difference from the hub's
    naming: a single shard is ``model-00001-of-00001.safetensors`` (with an
    index), as torch's ``HuggingFaceStorageWriter`` names it for
    ``last_save_in_hf``, rather than ``model.safetensors``; transformers loads both.
    """
    from huggingface_hub import StateDictSplit, split_torch_state_dict_into_shards

    if not layout:
        raise ValueError("no tensors to write")
    size = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    split = split_torch_state_dict_into_shards(
        meta_layout(layout), filename_pattern=HF_WEIGHTS_PATTERN, max_shard_size=size
    )
    if split.is_sharded:
        return split
    names = list(layout)
    return StateDictSplit(metadata=split.metadata, filename_to_tensors={HF_ONE_SHARD: names},
                          tensor_to_filename=dict.fromkeys(names, HF_ONE_SHARD))


def save_hf_weights(
    folder: str | Path,
    tensors: Mapping[str, torch.Tensor] | Iterable[Mapping[str, torch.Tensor]],
    *,
    max_shard_size: int | str = 5 * 10**9,
    layout: Mapping[str, torch.Tensor] | None = None,
) -> Any:
    """Write HF-named tensors into ``folder`` as safetensors shards of at most
    ``max_shard_size`` bytes, plus ``model.safetensors.index.json``; return the
    plan (:func:`plan_hf_shards`).

    ``tensors`` is one state dict, or an iterable of state dicts (e.g. one per
    transformer block) whose tensors are not all in memory at once; then
    ``layout`` (see :func:`meta_layout`) gives every name, shape and dtype in
    order beforehand, the shards are planned from it, and each shard is written
    as soon as its last tensor arrives, so memory holds about one shard plus
    one chunk. The files and the index are what huggingface_hub's
    ``save_torch_state_dict`` writes for the same tensors in that order (same
    split, ``{"format": "pt"}`` metadata, ``total_size``), except the naming of
    a single shard (:func:`plan_hf_shards`). Raises ValueError, leaving partial
    files, for a tensor that is not in the layout, arrives twice, or has
    another shape or dtype, and for tensors that never arrive.
    """
    from safetensors.torch import save_file

    if isinstance(tensors, Mapping):
        chunks: Iterable[Mapping[str, torch.Tensor]] = [tensors]
        layout = tensors if layout is None else layout
    elif layout is None:
        raise TypeError("save_hf_weights: give the layout of tensors that arrive in chunks")
    else:
        chunks = tensors
    plan = plan_hf_shards(layout, max_shard_size)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in layout.items()}
    pending: dict[str, dict[str, torch.Tensor]] = {file: {} for file in plan.filename_to_tensors}
    seen: set[str] = set()
    for chunk in chunks:
        for name, tensor in chunk.items():
            if name not in expected or name in seen:
                raise ValueError(f"{name}: {'given twice' if name in seen else 'not one of the planned tensors'}")
            if (tuple(tensor.shape), tensor.dtype) != expected[name]:
                raise ValueError(f"{name}: {tuple(tensor.shape)} {tensor.dtype}, planned as "
                                 f"{expected[name][0]} {expected[name][1]}")
            seen.add(name)
            file = plan.tensor_to_filename[name]
            pending[file][name] = own_storage(tensor)
            if len(pending[file]) == len(plan.filename_to_tensors[file]):
                shard = pending.pop(file)
                save_file({k: shard[k] for k in plan.filename_to_tensors[file]},
                          os.path.join(folder, file), metadata={"format": "pt"})
    if pending:
        missing = sorted(expected.keys() - seen)
        raise ValueError(f"{len(missing)} planned tensor(s) never arrived: {missing[:3]}")
    with open(os.path.join(folder, HF_INDEX), "w") as f:
        json.dump({"metadata": dict(plan.metadata), "weight_map": plan.tensor_to_filename}, f,
                  indent=2, sort_keys=True)
    return plan


class HFFolderError(ValueError):
    """An HF folder whose index or shards do not hold the model's tensors."""


def check_hf_index(folder: str | Path, layout: Mapping[str, torch.Tensor]) -> int:
    """Raise :class:`HFFolderError` unless ``folder/model.safetensors.index.json`` maps
    exactly the names of ``layout`` to shard files that hold them with
    ``layout``'s shapes (read from the safetensors headers only). Returns the
    number of shard files."""
    from safetensors import safe_open

    path = os.path.join(folder, HF_INDEX)
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HFFolderError(f"{path} is not a readable safetensors index ({exc})") from None
    missing, extra = sorted(layout.keys() - weight_map.keys()), sorted(weight_map.keys() - layout.keys())
    if missing or extra:
        raise HFFolderError(f"{path} does not list the model's tensors: missing {missing[:3]}, unexpected {extra[:3]}")
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        shard = os.path.join(folder, file)
        if not os.path.isfile(shard):
            raise HFFolderError(f"{path} names {file}, which is not in {folder}")
        with safe_open(shard, "pt") as f:
            held = set(f.keys())
            for name in names:
                if name not in held:
                    raise HFFolderError(f"{shard} has no {name}, which the index puts there")
                if tuple(f.get_slice(name).get_shape()) != tuple(layout[name].shape):
                    raise HFFolderError(f"{shard}: {name} has shape {tuple(f.get_slice(name).get_shape())}, "
                                        f"the model {tuple(layout[name].shape)}")
    return len(by_file)


def complete_hf_folder(
    folder: str | Path,
    model_args: Any,
    *,
    dtype: Any,
    tokenizer_dir: str | None,
    model_name: str | None = None,
    layout: Mapping[str, torch.Tensor] | None = None,
) -> list[str]:
    """Make a folder of HF safetensors and their index loadable by transformers.

    Checks the index against the model (:func:`check_hf_index`; ``layout``
    defaults to :func:`hf_layout_for` the model), then writes config.json,
    generation_config.json and the tokenizer files (:func:`write_hf_metadata`).
    Used for ``dcp-to-hf`` and for ``last_save_in_hf`` folders. Raises
    :class:`HFFolderError`, having written nothing, when the weights do not
    match (ConfigError for a model HF cannot express, as :func:`hf_config_for`).
    Returns the tokenizer files copied.
    """
    if model_name is None:
        model_name = _model_name_for_args(model_args)
    check_hf_index(folder, hf_layout_for(model_name, model_args) if layout is None else layout)
    return write_hf_metadata(str(folder), model_args, dtype=dtype, tokenizer_dir=tokenizer_dir,
                             model_name=model_name)
