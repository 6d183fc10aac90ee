"""ext.job_config merges into torchtitan's config and registers our spec."""

from __future__ import annotations

import pytest
from torchtitan.config import ConfigManager
from torchtitan.protocols.train_spec import get_train_spec

import ext.job_config  # noqa: F401
from ext.train import with_config_module

from .conftest import DEBUG_CONFIG


def parse(*args: str):
    return ConfigManager().parse_args(list(args))


def test_custom_module_merges_our_fields_into_torchtitan_sections():
    cfg = parse("--job.custom_config_module", "ext.job_config", "--metrics.summary_file", "s.json")
    assert cfg.metrics.summary_file == "s.json"
    assert cfg.metrics.log_freq == 10  # torchtitan's own field of the same section survives
    assert cfg.training.seq_len == 2048


def test_shipped_debug_config_parses_with_its_module():
    cfg = parse("--job.config_file", str(DEBUG_CONFIG))
    assert cfg.job.custom_config_module == "ext.job_config"
    assert cfg.model.name == "ext_llama3" and cfg.model.flavor == "tiny"
    assert cfg.metrics.summary_file == "train_summary.json"


def test_toml_key_unknown_to_both_configs_is_rejected(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[job]\ncustom_config_module = "ext.job_config"\n[metrics]\nsumary_file = "x"\n')
    with pytest.raises(ValueError, match="sumary_file"):
        parse("--job.config_file", str(bad))


def test_our_field_is_unknown_without_the_module(tmp_path):
    toml = tmp_path / "plain.toml"
    toml.write_text('[metrics]\nsummary_file = "x"\n')
    with pytest.raises(ValueError, match="summary_file"):
        parse("--job.config_file", str(toml))


def test_train_spec_is_registered_with_tiny_flavors_and_fixed_parallelize():
    spec = get_train_spec("ext_llama3")
    assert {"tiny", "nano", "debugmodel", "8B"} <= set(spec.model_args)
    assert spec.model_args["tiny"].vocab_size == 2048
    assert spec.parallelize_fn.__name__ == "parallelize_llama_ext"


def test_entry_point_adds_config_module_only_when_none_is_named(tmp_path):
    assert with_config_module(["--training.steps", "3"])[-1] == "--job.custom_config_module=ext.job_config"
    named = ["--job.custom_config_module", "my.module"]
    assert with_config_module(named) == named
    toml = tmp_path / "c.toml"
    toml.write_text('[job]\ncustom_config_module = "my.module"\n')
    args = ["--job.config_file", str(toml)]
    assert with_config_module(args) == args
    toml.write_text('[training]\nsteps = 3\n')
    assert with_config_module(args)[-1] == "--job.custom_config_module=ext.job_config"
