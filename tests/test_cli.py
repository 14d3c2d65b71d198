"""The stages' command lines: early config errors (before torch loads), generated --help, --print-config,
one error line under a launcher, a free port for single-process runs, console scripts for every entry."""
import ast
import importlib
import os
import socket
import subprocess
import sys
import time
import typing

import pytest
import yaml

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.loader import load_config, to_dict
from megatron_bluelm.config.schema import ModelConfig, RunConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("pretrain", "sft", "multimodal")
RECIPES = {"pretrain": "examples/pretrain_tiny.yaml", "sft": "examples/sft_tiny.yaml",
           "multimodal": "examples/mm_stage1_tiny.yaml"}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=REPO, **extra)
    return env


def _stage(stage, *args, cwd, **env):
    return subprocess.run([sys.executable, "-m", f"megatron_bluelm.stages.{stage}", *args], cwd=cwd,
                          env=_env(**env), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("stage", STAGES)
def test_config_typo_is_reported_before_torch_loads(stage, tmp_path):
    start = time.perf_counter()
    r = _stage(stage, "--config", os.path.join(REPO, RECIPES[stage]), "--parallel.tpp", "1", cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["config error: unknown config key 'parallel.tpp' (did you mean 'tp'?)"]
    if elapsed >= 3.0:  # a loaded machine: then it must still be far quicker than importing torch alone
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, megatron.core"], cwd=tmp_path, env=_env())
        heavy = time.perf_counter() - start
        assert elapsed < 0.5 * heavy, f"{elapsed:.1f} s to report a config typo (importing torch: {heavy:.1f} s)"
    # and in-process: the error path never imports torch
    code = (f"import sys\nfrom megatron_bluelm.stages import {stage}\n"
            f"try:\n    {stage}.main(['--parallel.tpp', '1'])\nexcept SystemExit as e:\n"
            f"    print(e.code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert out.stdout.split() == ["2", "False"], out.stdout + out.stderr


def test_world_size_error_says_how_to_launch(tmp_path):
    r = _stage("pretrain", "--config", os.path.join(REPO, "examples/pretrain_tiny.yaml"), cwd=tmp_path)
    assert r.returncode == 2
    assert "torchrun --nproc-per-node 4" in r.stderr and "--parallel.tp 1 --parallel.pp 1" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_config_error_printed_once_under_a_launcher(tmp_path):
    """Rank 0 prints the line and marks it done; the other ranks print nothing and exit once it has
    (torchrun stops all processes when the first exits, so an early silent exit could swallow the line)."""
    import tempfile
    import uuid

    run_id = uuid.uuid4().hex
    marker = os.path.join(tempfile.gettempdir(), f"bluelm-config-error-{run_id}-")
    launch = dict(WORLD_SIZE="2", TORCHELASTIC_RUN_ID=run_id)
    other = subprocess.Popen([sys.executable, "-m", "megatron_bluelm.stages.sft", "--trainng.seed", "1"], cwd=tmp_path,
                             env=_env(RANK="1", LOCAL_RANK="1", **launch), stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert other.poll() is None, "rank 1 exited before rank 0 reported the error"
    first = _stage("sft", "--trainng.seed", "1", cwd=tmp_path, RANK="0", LOCAL_RANK="0", **launch)
    _, other_err = other.communicate(timeout=60)
    try:
        assert first.returncode == 2 and other.returncode == 2
        assert first.stderr.strip().splitlines() == ["config error: unknown config key 'trainng' (did you mean "
                                                     "'training'?)"]
        assert other_err.strip() == "" and "Traceback" not in first.stderr
    finally:
        os.unlink(marker)


def test_help_lists_every_field_with_type_default_and_choices(tmp_path):
    from megatron_bluelm.config.cli import describe_fields

    r = _stage("pretrain", "--help", cwd=tmp_path)
    assert r.returncode == 0
    text = r.stdout
    n = 0
    for _, _, fields in describe_fields():
        for f in fields:
            line = next((ln for ln in text.splitlines() if ln.startswith(f"  --{f.key} ")), None)
            assert line is not None, f"--{f.key} missing from --help"
            assert f.type in line
            n += 1
    assert n == sum(len(__import__("dataclasses").fields(type(s))) for s in
                    (getattr(RunConfig(), f) for f in RunConfig.__dataclass_fields__))
    assert "--model.backend {auto,te,fused,torch}" in text and "[default: auto]" in text
    assert "--training.recompute {none,selective,full}" in text
    assert "--model.preset {bluelm-2.5-3b,bluelm-2.5-3b-proxy8,tiny}" in text
    assert "tensor parallel size [default: 1]" in " ".join(text.split())


@pytest.mark.parametrize("stage", [*STAGES, "rl"])
def test_every_stage_has_the_generated_help_and_print_config(stage, tmp_path):
    r = _stage(stage, "--help", cwd=tmp_path)
    assert r.returncode == 0 and "--print-config" in r.stdout and "  --rl.group_size INT" in r.stdout, r.stderr
    assert "  --parallel.tp INT" in r.stdout and "--config CONFIG" in r.stdout


def test_choices_have_one_source():
    from megatron_bluelm.config.schema import choices_of, literal_choices
    from megatron_bluelm.models.spec import BACKENDS

    assert ("auto", *BACKENDS) == choices_of(ModelConfig, "backend")
    hints = typing.get_type_hints(ModelConfig)
    assert literal_choices(hints["backend"]) == ("auto", "te", "fused", "torch")
    with pytest.raises(ConfigError, match=r"model.backend: 'cuda' is not one of .*'auto'"):
        load_config(None, ["--model.backend", "cuda"])
    with pytest.raises(ConfigError, match=r"did you mean 'selective'"):
        load_config(None, ["--training.recompute", "selectve"])
    # YAML reads `recompute: none` as a string and stays a valid choice
    assert load_config(None, ["--training.recompute", "none"]).training.recompute == "none"
    validate_src = open(os.path.join(REPO, "megatron_bluelm/config/validate.py")).read()
    assert "_CHOICES" not in validate_src


def test_help_text_comes_from_the_source_comments():
    from megatron_bluelm.config.cli import format_fields_help

    text = format_fields_help()
    assert "GQA key/value groups" in text  # the comment beside ModelConfig.num_query_groups
    assert "multimodal" not in text.split("--model.backend")[0].split("\n")[-1]


def test_print_config_is_a_checked_dry_run(tmp_path):
    args = ["--config", os.path.join(REPO, "examples/pretrain_tiny.yaml"), "--parallel.tp", "1", "--parallel.pp",
            "1", "--data.mock", "true", "--training.train_steps", "7"]
    r = _stage("pretrain", *args, "--print-config", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    cfg = load_config(os.path.join(REPO, "examples/pretrain_tiny.yaml"), args[2:])
    from megatron_bluelm.config.validate import validate

    validate(cfg, 1)
    assert printed == to_dict(cfg)
    assert printed["model"]["num_layers"] == 4  # the preset applied
    assert not os.listdir(tmp_path)  # nothing written, nothing trained
    bad = _stage("pretrain", *args[:-1], "0", "--print-config", cwd=tmp_path)
    assert bad.returncode == 2 and "training.train_steps" in bad.stderr


def test_single_process_run_takes_a_free_port_when_29512_is_held(tmp_path):
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 29512))
        holder.listen()
    except OSError:
        pytest.skip("port 29512 is in use by something else: nothing to hold")
    try:
        code = ("from megatron_bluelm.parallel.setup import setup_parallel, teardown\n"
                "info = setup_parallel(1, 1, None, 1, 0, 'gloo'); print('ok', info.world_size); teardown()")
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=120)
    finally:
        holder.close()
    assert r.stdout.split() == ["ok", "1"], r.stderr[-2000:]


def test_a_short_run_shows_no_known_noise_warnings(tmp_path):
    r = _stage("pretrain", "--config", os.path.join(REPO, "examples/pretrain_tiny.yaml"), "--parallel.tp", "1",
               "--parallel.pp", "1", "--data.mock", "true", "--training.train_steps", "1", "--schedule.warmup_steps",
               "0", "--training.eval_interval", "0", "--training.global_batch_size", "4",
               "--logging.tensorboard", "false", "--logging.output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step      1/1" in r.stdout
    assert "Warning" not in r.stderr, r.stderr


def _console_scripts() -> dict[str, str]:
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            scripts = ast.literal_eval(node.value)["console_scripts"]
            return dict(s.split("=", 1) for s in scripts)
    raise AssertionError("setup.py has no entry_points")


def _entry_modules() -> set[str]:
    """Committed stage and tool modules with a main() (work in progress not yet in git is left out)."""
    tracked = subprocess.run(["git", "ls-files", "megatron_bluelm/stages", "tools"], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    out = set()
    for path in tracked:
        if path.endswith(".py") and path.count("/") == (2 if path.startswith("megatron_bluelm") else 1):
            if "\ndef main(" in open(os.path.join(REPO, path)).read():
                out.add(path[:-3].replace("/", "."))
    return out


def test_console_script_for_every_stage_and_tool():
    scripts = _console_scripts()
    targets = {t.split(":")[0] for t in scripts.values()}
    entries = _entry_modules()
    assert {"megatron_bluelm.stages.pretrain", "tools.preprocess_data"} <= entries
    assert entries <= targets, f"no console script for {sorted(entries - targets)}"
    sys.path.insert(0, REPO)
    try:
        for name, target in scripts.items():
            module, func = target.split(":")
            assert callable(getattr(importlib.import_module(module), func)), name
    finally:
        sys.path.remove(REPO)


def _readme_error_examples():
    """(command, expected first stderr line) for README lines `$ python|torchrun ...` followed by the error."""
    lines = open(os.path.join(REPO, "README.md")).read().splitlines()
    out = []
    for cmd, expected in zip(lines, lines[1:]):
        if cmd.startswith(("$ python ", "$ torchrun ")) and expected.startswith("config error:"):
            out.append((cmd[2:], expected))
    return out


@pytest.mark.parametrize("command,expected", _readme_error_examples())
def test_readme_error_examples_are_what_the_commands_print(command, expected):
    import shlex

    argv = shlex.split(command)
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", *argv[1:]]
    else:
        argv[0] = sys.executable
    r = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.splitlines().count(expected) == 1, r.stderr[-3000:]
