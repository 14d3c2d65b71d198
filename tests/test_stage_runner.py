"""The stages share one runner (stages/runner.py): the same checks and loader settings for pretrain, SFT
and the multimodal stage."""
import os
import subprocess
import sys

import pytest
from distributed import run_distributed
from stage_workers import pretrain_recording_loader_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("stage,extra", [
    ("pretrain", []), ("sft", []), ("multimodal", ["--vision.preset", "vit-tiny"])])
def test_every_stage_refuses_a_vocabulary_smaller_than_the_tokenizers(stage, extra, tmp_path):
    # mock data: nothing to preprocess; the check comes before any process group or model
    code = (f"from megatron_bluelm.config.loader import load_config\n"
            f"from megatron_bluelm.stages.{stage} import run_{stage}\n"
            f"cfg = load_config(None, ['--data.mock', 'true', '--model.vocab_size', '1000', "
            f"'--logging.output_dir', {str(tmp_path / 'log')!r}, *{extra!r}])\n"
            f"run_{stage}(cfg)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert "model.vocab_size (1000) is smaller than the tokenizer's vocabulary (8192" in r.stderr, r.stderr[-3000:]


def test_pretrain_uses_data_num_workers(tmp_path):
    overrides = ["--data.mock", "true", "--data.seq_length", "32", "--data.num_workers", "1",
                 "--training.train_steps", "1", "--training.global_batch_size", "2", "--training.micro_batch_size",
                 "2", "--training.eval_interval", "0", "--schedule.warmup_steps", "0", "--logging.tensorboard",
                 "false", "--logging.output_dir", str(tmp_path / "log"), "--model.backend", "torch"]
    result = run_distributed(pretrain_recording_loader_args, 1, overrides)[0]
    assert result["steps"] == 1
    assert result["loader_args"] and all(a["num_workers"] == 1 for a in result["loader_args"])
