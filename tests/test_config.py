"""Config loading, overrides and early validation: every error names the field at fault."""
import time

import pytest

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.loader import load_config
from megatron_bluelm.config.validate import pipeline_layer_split, validate


def _cfg(*overrides, path=None):
    return load_config(path, ["--data.mock", "true", *overrides])


def test_yaml_then_cli_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("parallel:\n  tp: 2\ntraining:\n  train_steps: 7\noptimizer:\n  lr: 1e-3\n")
    cfg = _cfg("--training.train_steps=9", "--parallel.sequence_parallel", "true", path=recipe)
    assert cfg.parallel.tp == 2 and cfg.training.train_steps == 9 and cfg.optimizer.lr == 1e-3
    assert cfg.parallel.sequence_parallel is True


def test_preset_fills_unset_fields_only():
    cfg = _cfg("--model.preset", "bluelm-2.5-3b", "--model.num_layers", "8")
    validate(cfg, world_size=1)
    assert cfg.model.num_layers == 8 and cfg.model.hidden_size == 2560 and cfg.model.num_query_groups == 4


@pytest.mark.parametrize("overrides,needle", [
    (["--parallel.tpp", "2"], "did you mean 'tp'"),
    (["--trainng.seed", "1"], "did you mean 'training'"),
    (["--training.train_steps", "ten"], "training.train_steps: expected an integer"),
    (["--parallel.sequence_parallel", "maybe"], "parallel.sequence_parallel: expected true/false"),
    (["--model", "x"], "model: is a section"),
])
def test_bad_keys_and_values_name_the_field(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        _cfg(*overrides)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("optimizer:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*optimizer.learning_rate"):
        load_config(recipe)


@pytest.mark.parametrize("overrides,world,needle", [
    (["--parallel.tp", "8"], 8, r"model.num_attention_heads \(4\) is not divisible by parallel.tp \(8\)"),
    (["--parallel.tp", "4", "--model.num_attention_heads", "8"], 4,
     r"model.num_query_groups \(2\) is not divisible by parallel.tp \(4\)"),
    (["--parallel.pp", "3"], 3, r"model.num_layers \(4\) is not divisible by parallel.pp \(3\)"),
    (["--parallel.tp", "2"], 3, r"world size \(3\) is not divisible by parallel.tp x parallel.pp"),
    (["--training.global_batch_size", "6", "--training.micro_batch_size", "4"], 1,
     r"training.global_batch_size \(6\) must be divisible by training.micro_batch_size"),
    (["--training.global_batch_size", "8", "--training.micro_batch_size", "2"], 8,
     r"micro_batch_size x data-parallel size \(2 x 8 = 16\)"),
    (["--parallel.sequence_parallel", "true"], 1, "parallel.sequence_parallel needs parallel.tp > 1"),
    (["--parallel.pp", "2", "--parallel.vpp", "4"], 2, r"not divisible by parallel.vpp \(4\)"),
    (["--model.preset", "huge"], 1, "model.preset: unknown preset 'huge'"),
    (["--schedule.style", "wsd"], 1, "schedule.wsd_decay_steps: required"),
    (["--schedule.warmup_steps", "100", "--training.train_steps", "10"], 1, "schedule.warmup_steps"),
])
def test_validation_errors(overrides, world, needle):
    cfg = _cfg(*overrides)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=needle):
        validate(cfg, world_size=world)
    assert time.perf_counter() - start < 2.0  # fails before any heavy work


def test_choice_set_in_code_is_checked_by_validate():
    cfg = _cfg()
    cfg.model.backend = "cuda"  # the loader checks parsed values; validate catches values set in code
    with pytest.raises(ConfigError, match=r"model.backend: 'cuda' is not one of \['auto', 'te', 'fused', 'torch'\]"):
        validate(cfg, world_size=1)


def test_data_parallel_size_is_derived():
    assert validate(_cfg("--parallel.tp", "2", "--parallel.pp", "2"), world_size=8) == 2


def test_uneven_pipeline_split():
    cfg = _cfg("--model.num_layers", "10", "--parallel.pp", "4", "--parallel.first_stage_layers", "1",
               "--parallel.last_stage_layers", "3")
    validate(cfg, world_size=4)
    assert pipeline_layer_split(cfg) == [1, 3, 3, 3]
    bad = _cfg("--model.num_layers", "10", "--parallel.pp", "4", "--parallel.first_stage_layers", "2")
    with pytest.raises(ConfigError, match="remaining pipeline stages"):
        validate(bad, world_size=4)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope.yaml")


def test_cli_reports_config_errors_quickly(tmp_path):
    import subprocess
    import sys

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "megatron_bluelm.stages.pretrain", "--parallel.tp", "3",
                           "--data.mock", "true"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "model.num_attention_heads (4) is not divisible by parallel.tp (3)" in proc.stderr
    assert time.perf_counter() - start < 30


def test_none_is_a_string_where_null_is_not_allowed():
    cfg = _cfg("--training.recompute", "none", "--parallel.vpp", "none", "--model.vocab_size", "null")
    assert cfg.training.recompute == "none" and cfg.parallel.vpp is None and cfg.model.vocab_size is None
