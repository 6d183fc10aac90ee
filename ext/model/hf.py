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
  into one of our models.

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
import os
import shutil
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
