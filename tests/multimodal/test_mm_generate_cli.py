"""tools/generate.py on a checkpoint written by the multimodal stage: image prompts end to end, the
same answer under TP2, and the CLI's errors for bad image arguments."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from distributed import run_distributed
from mm_workers import overrides, train_mm

from megatron_bluelm.config.data import ASSETS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GENERATE = os.path.join(REPO, "tools", "generate.py")
CAT = os.path.join(ASSETS, "images", "chelsea.jpg")
TALL = os.path.join(ASSETS, "images", "rocket_tall.jpg")


def _cli():
    spec = importlib.util.spec_from_file_location("generate_cli", GENERATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mm_ckpt(mm_prefix, tmp_path_factory):
    """One training step of the multimodal stage under PP2 (so the checkpoint's config holds a
    pipeline split that generation with another layout must drop), saved."""
    out = tmp_path_factory.mktemp("mm_gen")
    ckpt = str(out / "ckpt")
    run_distributed(train_mm, 2, overrides(mm_prefix, str(out), 1, ["--parallel.pp", "2", "--checkpoint.save", ckpt]))
    return ckpt


def _generate(ckpt, *extra, nproc=1):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     "--nproc-per-node", str(nproc)]
    cmd = launcher + [GENERATE, "--checkpoint", ckpt, "--json", "--max-new-tokens", "6", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


ARGS = ["--chat", "--prompt", "<image> What is in the picture?", "--prompt", "Which is taller, <image> or <image>?",
        "--image", CAT, "--image", CAT, "--image", TALL, "--thinking-budget", "2"]


@pytest.fixture(scope="module")
def tp1_results(mm_ckpt):
    proc = _generate(mm_ckpt, *ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_cli_generates_from_image_prompts(tp1_results):
    assert [r["images"] for r in tp1_results] == [[CAT], [CAT, TALL]]
    for r in tp1_results:
        assert r["finish_reason"] in ("stop", "length") and r["thinking_tokens"] <= 2


def test_cli_tp2_gives_the_same_text(mm_ckpt, tp1_results):
    proc = _generate(mm_ckpt, *ARGS, "--tp", "2", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")] == tp1_results


@pytest.mark.parametrize("extra, expected", [
    (["--prompt", "<image> hi", "--image", "nowhere/missing.jpg"], "cannot read image file 'nowhere/missing.jpg'"),
    (["--prompt", "<image> hi", "--image", GENERATE], "generate.py': cannot decode image"),
    (["--prompt", "<image> and <image>", "--image", CAT], "2 <image> placeholder(s) (prompt 0: 2) but 1 image(s)"),
    (["--prompt", "a", "--prompt", "b", "--image", CAT], "1 image(s) for 2 prompts without any <image> placeholder"),
])
def test_cli_image_errors(mm_ckpt, capsys, extra, expected):
    assert _cli().main(["--checkpoint", mm_ckpt, *extra]) == 2
    assert expected in capsys.readouterr().err


def test_cli_refuses_images_for_a_text_checkpoint():
    from megatron_bluelm.config.schema import RunConfig
    from megatron_bluelm.inference.errors import GenerationError

    cli = _cli()
    args = cli.parse_args(["--checkpoint", "text_ckpt", "--prompt", "hi", "--image", CAT])
    with pytest.raises(GenerationError, match=r"checkpoint 'text_ckpt' is a text decoder \(vision.preset: none\)"):
        cli._check_images(args, RunConfig())
