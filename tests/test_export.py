"""DCP -> Hugging Face export (`python -m ext.cli dcp-to-hf`, ext/export.py) and
the `last_save_in_hf` folder: transformers loads them and gives our logits."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from huggingface_hub import save_torch_state_dict, split_torch_state_dict_into_shards
from safetensors import safe_open
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torchtitan.protocols.train_spec import get_train_spec
from transformers import AutoModelForCausalLM

import ext.job_config  # noqa: F401  (registers our specs)
from ext.cli import main as cli_main
from ext.export import dcp_to_hf, parse_size
from ext.model.hf import HFFolderError, complete_hf_folder, read_safetensors
from ext.training.checkpoint import SafeCheckpointManager

from .conftest import DEBUG_CONFIG, TOKENIZER, run_command, run_train

FILES = {"config.json", "generation_config.json", "model.safetensors.index.json",
         "tokenizer.json", "tokenizer_config.json"}


def our_model(spec: str, flavor: str, checkpoint=None, seed: int = 0):
    """Our model of the flavor, with the weights of a DCP checkpoint, or random ones."""
    model = get_train_spec(spec).model_cls(copy.deepcopy(get_train_spec(spec).model_args[flavor]))
    if checkpoint is None:
        torch.manual_seed(seed)
        with torch.no_grad():
            model.init_weights(buffer_device=torch.device("cpu"))
            for name, p in model.named_parameters():  # no weight left at its init constant
                if p.ndim == 1:
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                elif name.endswith("router.gate.weight"):
                    p.normal_(std=0.5)  # far from uniform: top-k is not decided by rounding
                else:
                    p.add_(0.02 * torch.randn_like(p))
    else:
        state = model.state_dict()
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
        model.load_state_dict(state)
    return model.eval()


def max_logit_difference(hf_folder, model) -> float:
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32).eval()
    tokens = torch.randint(0, model.model_args.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (hf_model(tokens).logits - model(tokens)).abs().max().item()


def test_shard_sizes_read_as_transformers_reads_them():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500kb") == 500_000
    assert parse_size("123") == 123


# ----------------------------------------------- a real 2-process FSDP checkpoint


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """2-process FSDP run on CPU: a DCP checkpoint at step 1 and, through
    `last_save_in_hf`, an HF folder at step 2. The LR is so small that no fp32
    weight can move, so both hold the same weights."""
    dump = tmp_path_factory.mktemp("fsdp")
    run_train([
        "--job.config_file", str(DEBUG_CONFIG), "--job.dump_folder", str(dump),
        "--training.steps", "2", "--optimizer.lr", "1e-30",
        "--parallelism.data_parallel_replicate_degree", "1", "--parallelism.data_parallel_shard_degree", "2",
        "--checkpoint.enable", "--checkpoint.interval", "1", "--checkpoint.last_save_in_hf",
    ], nproc=2)
    return dump / "checkpoint"


@pytest.mark.slow
def test_export_of_a_two_process_fsdp_checkpoint_gives_our_logits(fsdp_run, tmp_path, python):
    step1 = fsdp_run / "step-1"
    assert sorted(p.name for p in step1.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    out = tmp_path / "hf"
    proc = run_command([python, "-m", "ext.cli", "dcp-to-hf", "--checkpoint", str(step1), "--out", str(out),
                        "--job.config_file", str(DEBUG_CONFIG), "--max-shard-size", "1MB"])
    assert proc.returncode == 0, proc.output[-4000:]
    assert FILES <= {p.name for p in out.iterdir()}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 1 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(read_safetensors(out))
    for shard in shards[:-1]:  # 1MB each, except one tensor bigger than that
        with safe_open(str(out / shard), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        assert len(sizes) == 1 or sum(torch.Size(s).numel() * 4 for s in sizes) <= 10**6
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 4]  # <|end_of_text|>, and the chat template's <|im_end|>
    assert max_logit_difference(out, our_model("ext_llama3", "tiny", step1)) < 1e-4


@pytest.mark.slow
def test_fsdp_shards_on_cpu_start_from_different_random_values(fsdp_run):
    """DTensor draws every CPU rank's shard from the same stream; ext.core.device
    seeds each shard apart, so the two halves of a weight are not copies."""
    model = our_model("ext_llama3", "tiny", fsdp_run / "step-1")  # LR 1e-30: still the init
    checked = 0
    for name, p in model.named_parameters():
        if p.ndim < 2 or p.shape[0] % 2:
            continue
        top, bottom = p.detach().chunk(2)
        assert (top - bottom).norm() > 0.5 * top.norm(), name  # independent draws: ~1.4x
        checked += 1
    assert checked >= 5


@pytest.mark.slow
def test_last_save_in_hf_is_a_folder_transformers_loads(fsdp_run, tmp_path):
    step2 = fsdp_run / "step-2"
    assert FILES <= {p.name for p in step2.iterdir()}
    assert not (step2 / "sharded").exists()
    assert cli_main(["dcp-to-hf", "--checkpoint", str(fsdp_run / "step-1"), "--out", str(tmp_path / "hf"),
                     "--job.config_file", str(DEBUG_CONFIG)]) == 0
    exported, saved = read_safetensors(tmp_path / "hf"), read_safetensors(step2)
    assert sorted(exported) == sorted(saved)
    assert all(torch.equal(exported[k], saved[k]) for k in saved)  # torch's writer == our export
    assert max_logit_difference(step2, our_model("ext_llama3", "tiny", fsdp_run / "step-1")) < 1e-4


@pytest.mark.slow
def test_an_existing_output_is_refused_unless_overwrite_and_never_half_written(fsdp_run, tmp_path, capsys):
    out = tmp_path / "hf"
    # no config: the model is identified from the checkpoint (ext_llama3 tiny), no tokenizer
    assert cli_main(["dcp-to-hf", "--checkpoint", str(fsdp_run), "--out", str(out)]) == 0
    assert "ext_llama3 tiny, identified from its tensors" in capsys.readouterr().out
    assert not (out / "tokenizer.json").exists()

    assert cli_main(["dcp-to-hf", "--checkpoint", str(fsdp_run / "step-1"), "--out", str(out)]) == 2
    assert f"error: --out {out} is not empty; pass --overwrite to replace it" in capsys.readouterr().err

    assert cli_main(["dcp-to-hf", "--checkpoint", str(fsdp_run / "step-1"), "--out", str(out), "--overwrite",
                     "--dtype", "bfloat16", "--job.config_file", str(DEBUG_CONFIG)]) == 0
    assert {t.dtype for t in read_safetensors(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").exists()

    # a checkpoint that breaks off mid-read: an error line, and no output or temporary folder
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (fsdp_run / "step-1").iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.name == "__1_0.distcp" else data)
    assert cli_main(["dcp-to-hf", "--checkpoint", str(broken), "--out", str(tmp_path / "never")]) == 2
    assert "could not be read" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "hf"]


# ------------------------------- every HF-mapped family: tied heads and MoE


@pytest.mark.parametrize("spec,flavor", [
    ("ext_llama3", "tiny_tied"), ("ext_qwen3", "tiny"),
    ("ext_qwen3", "tiny_moe"), ("ext_qwen3", "tiny_moe_tied"),
])
def test_export_matches_transformers_for_tied_and_moe_flavors(tmp_path, spec, flavor):
    ours = our_model(spec, flavor, seed=5)
    checkpoint = tmp_path / "step-0"
    dcp.save(get_model_state_dict(ours), checkpoint_id=str(checkpoint), no_dist=True)
    args = copy.deepcopy(get_train_spec(spec).model_args[flavor])
    summary = dcp_to_hf(str(checkpoint), str(tmp_path / "hf"), model_name=spec, model_args=args,
                        tokenizer_dir=str(TOKENIZER))
    assert summary["shards"] == 1
    tied = args.enable_weight_tying
    hf_keys = read_safetensors(tmp_path / "hf")
    assert ("lm_head.weight" in hf_keys) is not tied  # a tied head is written once
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is tied
    if "moe" in flavor:
        assert "model.layers.0.mlp.experts.7.down_proj.weight" in hf_keys
    assert max_logit_difference(tmp_path / "hf", ours) < 1e-4


def test_a_checkpoint_of_another_flavor_is_refused_with_the_fix(tmp_path):
    ours = our_model("ext_llama3", "nano")
    dcp.save(get_model_state_dict(ours), checkpoint_id=str(tmp_path / "step-0"), no_dist=True)
    code = cli_main(["dcp-to-hf", "--checkpoint", str(tmp_path / "step-0"), "--out", str(tmp_path / "hf"),
                     "--job.config_file", str(DEBUG_CONFIG)])  # debug.toml trains "tiny"
    assert code == 2
    assert not (tmp_path / "hf").exists()


# ------------------------------------- which model a checkpoint holds (no config)


@pytest.mark.parametrize("spec,flavor", [
    ("ext_qwen3", "tiny"), ("ext_llama3", "tiny_tied"), ("ext_llama3", "tiny"), ("ext_qwen3", "tiny_moe"),
])
def test_without_a_config_the_exact_tensor_set_identifies_the_model(tmp_path, capsys, spec, flavor):
    # dense Qwen3 tiny holds every tensor of Llama tiny_tied (same shapes) plus q/k norms
    ours = our_model(spec, flavor, seed=2)
    dcp.save(get_model_state_dict(ours), checkpoint_id=str(tmp_path / "step-0"), no_dist=True)
    assert cli_main(["dcp-to-hf", "--checkpoint", str(tmp_path / "step-0"), "--out", str(tmp_path / "hf")]) == 0
    assert f"({spec} {flavor}, identified from its tensors)" in capsys.readouterr().out
    assert max_logit_difference(tmp_path / "hf", ours) < 1e-4


# --------------------------- trained MoE: routing biases refused, aux loss exports exactly

MOE_CONFIG = DEBUG_CONFIG.parent / "debug_qwen3_moe.toml"
MOE_SHORT = ["--job.config_file", str(MOE_CONFIG), "--training.steps", "8", "--training.local_batch_size", "4",
             "--training.seq_len", "128", "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1"]


def _moe_run(dump, *extra):
    run_train([*MOE_SHORT, "--job.dump_folder", str(dump), "--checkpoint.enable", "--checkpoint.interval", "8",
               *extra])
    return dump / "checkpoint" / "step-8"


def routing(model_or_hf, tokens, ours: bool):
    """Logits and per-layer sets of chosen experts ((tokens, top_k), sorted) of one forward."""
    with torch.no_grad():
        if not ours:
            out = model_or_hf(tokens, output_router_logits=True)
            k = model_or_hf.config.num_experts_per_tok
            return out.logits, [torch.topk(r.float().softmax(-1), k).indices.sort(-1).values
                                for r in out.router_logits]
        chosen = []
        hooks = [b.moe.router.register_forward_hook(lambda m, a, o: chosen.append(o[1].sort(-1).values))
                 for b in model_or_hf.layers.values()]
        logits = model_or_hf(tokens)
        for h in hooks:
            h.remove()
        return logits, chosen


@pytest.mark.slow
def test_trained_moe_with_routing_biases_is_refused_and_with_the_aux_loss_exports_exactly(tmp_path, python, capsys):
    # bias balancing (DeepSeek-V3 style): nonzero biases after 8 steps -> refused, exit 2, nothing written
    biased = _moe_run(tmp_path / "bias", "--moe.load_balance_coeff", "1e-3", "--moe.aux_loss_coeff", "0")
    proc = run_command([python, "-m", "ext.cli", "dcp-to-hf", "--checkpoint", str(biased),
                        "--out", str(tmp_path / "hf_bias")])
    assert proc.returncode == 2, proc.output[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "nonzero routing biases" in error[0] and "--allow-routing-drift" in error[0]
    assert "Traceback" not in proc.output and not (tmp_path / "hf_bias").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"bias"}  # no temporary folder either
    # the explicit opt-in writes it, and it does route differently
    assert cli_main(["dcp-to-hf", "--checkpoint", str(biased), "--out", str(tmp_path / "hf_bias"),
                     "--allow-routing-drift"]) == 0
    assert "--allow-routing-drift" in capsys.readouterr().err
    tokens = torch.randint(0, 2048, (4, 64), generator=torch.Generator().manual_seed(3))
    bias_args = copy.deepcopy(get_train_spec("ext_qwen3").model_args["tiny_moe"])  # it has no bias buffers
    bias_args.moe_args = dataclasses.replace(bias_args.moe_args, load_balance_coeff=1e-3)
    bias_model = get_train_spec("ext_qwen3").model_cls(bias_args)
    state = bias_model.state_dict()
    dcp.load(state, checkpoint_id=str(biased), no_dist=True)
    bias_model.load_state_dict(state)
    hf_bias = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_bias"), dtype=torch.float32).eval()
    ours_logits, ours_chosen = routing(bias_model.eval(), tokens, ours=True)
    hf_logits, hf_chosen = routing(hf_bias, tokens, ours=False)
    changed = [(a != b).any(-1).float().mean().item() for a, b in zip(ours_chosen, hf_chosen)]
    print(f"bias run: tokens whose expert set changed per layer {changed}, "
          f"max |dlogits| {(ours_logits - hf_logits).abs().max().item():.3g}")
    assert max(changed) > 0

    # Qwen3's auxiliary loss (the default): the export is the trained model
    aux = _moe_run(tmp_path / "aux")
    out = tmp_path / "hf_aux"
    proc = run_command([python, "-m", "ext.cli", "dcp-to-hf", "--checkpoint", str(aux), "--out", str(out),
                        "--job.config_file", str(MOE_CONFIG), "--training.seq_len", "128"])
    assert proc.returncode == 0, proc.output[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["max_position_embeddings"] == 4096
    ours = our_model("ext_qwen3", "tiny_moe", aux)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours_logits, ours_chosen = routing(ours, tokens, ours=True)
    hf_logits, hf_chosen = routing(hf, tokens, ours=False)
    diff = (ours_logits - hf_logits).abs().max().item()
    print(f"aux run: max |dlogits| {diff:.3g}, expert sets equal in {len(ours_chosen)} layers")
    assert diff < 1e-4
    assert len(ours_chosen) == len(hf_chosen) == 4
    assert all(torch.equal(a, b) for a, b in zip(ours_chosen, hf_chosen))


@pytest.mark.slow
def test_last_save_in_hf_with_routing_biases_is_refused_before_training(tmp_path):
    proc = run_command(["./run_train.sh", *MOE_SHORT, "--job.dump_folder", str(tmp_path / "out"),
                        "--checkpoint.enable", "--checkpoint.last_save_in_hf", "--moe.load_balance_coeff", "1e-3"])
    assert proc.returncode == 2, proc.output[-3000:]
    assert "error: [checkpoint] last_save_in_hf with [moe] load_balance_coeff = 0.001" in proc.output
    assert "Traceback" not in proc.output
    assert not (tmp_path / "out" / "checkpoint").exists()


# ------------------- one HF writer: huggingface_hub's split, the tied head, sizes


def _checkpoint(tmp_path, spec: str, flavor: str, seed: int = 3):
    ours = our_model(spec, flavor, seed=seed)
    dcp.save(get_model_state_dict(ours), checkpoint_id=str(tmp_path / "step-0"), no_dist=True)
    return ours, tmp_path / "step-0"


def _hub_folder(ours, spec: str, folder, max_shard_size) -> dict:
    """What huggingface_hub's save_torch_state_dict writes for our model's HF state dict."""
    adapter = get_train_spec(spec).state_dict_adapter(ours.model_args, None)
    state = {k: v.detach().clone() for k, v in adapter.to_hf(ours.state_dict()).items()}
    folder.mkdir()
    save_torch_state_dict(state, str(folder), max_shard_size=max_shard_size)
    return state


def _shards(folder) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out[file.name] = {k: f.get_tensor(k) for k in f.keys()}
            assert f.metadata() == {"format": "pt"}
    return out


def _same_shards(a, b) -> None:
    shards_a, shards_b = _shards(a), _shards(b)
    assert {f: sorted(t) for f, t in shards_a.items()} == {f: sorted(t) for f, t in shards_b.items()}
    for file, tensors in shards_a.items():
        assert all(torch.equal(v, shards_b[file][k]) for k, v in tensors.items())


def test_export_shards_and_index_are_what_huggingface_hub_writes(tmp_path):
    # 150 kB: each 192 kB MLP matrix exceeds it and gets a shard of its own, while
    # the attention and norm tensors around it keep filling the current shard
    ours, checkpoint = _checkpoint(tmp_path, "ext_llama3", "tiny")
    _hub_folder(ours, "ext_llama3", tmp_path / "hub", 150_000)
    summary = dcp_to_hf(str(checkpoint), str(tmp_path / "hf"), model_name="ext_llama3",
                        model_args=copy.deepcopy(ours.model_args), tokenizer_dir=None,
                        max_shard_size=150_000)
    hub_index = json.loads((tmp_path / "hub" / "model.safetensors.index.json").read_text())
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert index == hub_index and summary["shards"] == len(set(index["weight_map"].values())) > 1
    assert summary["bytes"] == index["metadata"]["total_size"]
    _same_shards(tmp_path / "hf", tmp_path / "hub")
    assert max_logit_difference(tmp_path / "hf", ours) < 1e-4


@pytest.mark.parametrize("size", ["150KiB", "0.2MB"])
def test_a_max_shard_size_string_splits_as_the_hub_splits_its_byte_count(tmp_path, size):
    ours, checkpoint = _checkpoint(tmp_path, "ext_llama3", "tiny")
    _hub_folder(ours, "ext_llama3", tmp_path / "hub", parse_size(size))
    assert cli_main(["dcp-to-hf", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf"),
                     "--max-shard-size", size]) == 0
    _same_shards(tmp_path / "hf", tmp_path / "hub")
    if size.endswith("MB"):  # the hub reads decimal units itself: the same bytes
        assert split_torch_state_dict_into_shards(ours.state_dict(), max_shard_size=size) == \
            split_torch_state_dict_into_shards(ours.state_dict(), max_shard_size=parse_size(size))


def test_a_bad_max_shard_size_is_one_error_line(tmp_path, capsys):
    assert cli_main(["dcp-to-hf", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf"),
                     "--max-shard-size", "5XB"]) == 2
    assert capsys.readouterr().err == \
        "error: --max-shard-size '5XB' is not a size; write e.g. 5GB, 500MB or 2GiB\n"
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("spec,flavor", [("ext_llama3", "tiny_tied"), ("ext_qwen3", "tiny_moe_tied")])
def test_a_tied_head_is_written_once_and_transformers_ties_it(tmp_path, capsys, spec, flavor):
    ours, checkpoint = _checkpoint(tmp_path, spec, flavor)
    dcp_to_hf(str(checkpoint), str(tmp_path / "hf"), model_name=spec, model_args=copy.deepcopy(ours.model_args),
              tokenizer_dir=None, progress=True)
    assert "dcp-to-hf: 100%" in capsys.readouterr().err  # the progress bar, forced on
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"] and "lm_head.weight" not in read_safetensors(tmp_path / "hf")
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    hf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(hf_model.lm_head.weight, ours.output.weight.detach())


def _hf_state(ours, spec):
    adapter = get_train_spec(spec).state_dict_adapter(ours.model_args, None)
    return {k: v.detach().clone() for k, v in adapter.to_hf(ours.state_dict()).items()}


class _Adapter:
    def __init__(self, model_args):
        self.model_args, self.hf_assets_path = model_args, str(TOKENIZER)


def _last_save_in_hf_completion(folder, model_args):
    """SafeCheckpointManager's completion of a last_save_in_hf folder, on one process."""
    manager = object.__new__(SafeCheckpointManager)
    manager.sd_adapter, manager.states, manager.export_dtype = _Adapter(model_args), {}, torch.float32
    manager._complete_hf_folder(str(folder))


def _torch_hf_save(folder, state) -> None:
    """torch's HuggingFaceStorageWriter, as torchtitan's last_save_in_hf uses it (one process)."""
    folder.mkdir()
    dcp.save(state, no_dist=True,
             storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True, enable_consolidation=True))


def test_last_save_in_hf_completion_checks_the_folder_and_writes_the_metadata(tmp_path):
    ours = our_model("ext_llama3", "tiny_tied", seed=4)
    _torch_hf_save(tmp_path / "step-2", _hf_state(ours, "ext_llama3"))
    _last_save_in_hf_completion(tmp_path / "step-2", ours.model_args)
    assert FILES <= {p.name for p in (tmp_path / "step-2").iterdir()} and not (tmp_path / "step-2" / "sharded").exists()
    assert max_logit_difference(tmp_path / "step-2", ours) < 1e-4


def test_a_last_save_in_hf_folder_with_a_second_head_for_a_tied_model_gets_no_config(tmp_path, caplog):
    ours = our_model("ext_llama3", "tiny_tied", seed=4)
    folder = tmp_path / "step-2"
    state = _hf_state(ours, "ext_llama3")
    _torch_hf_save(folder, {**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()})
    with caplog.at_level("WARNING"):
        _last_save_in_hf_completion(folder, ours.model_args)
    assert "not a complete Hugging Face folder" in caplog.text and "lm_head.weight" in caplog.text
    assert not (folder / "config.json").exists()
    with pytest.raises(HFFolderError, match=r"unexpected \['lm_head.weight'\]"):
        complete_hf_folder(folder, ours.model_args, dtype="float32", tokenizer_dir=None)
