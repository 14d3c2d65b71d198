"""Checkpoint tests share one reference run (TP1, 6 steps, checkpoints at 3 and 6) per session."""
import pytest
from ckpt_workers import convert, pretrain, tiny_overrides
from distributed import run_distributed


@pytest.fixture(scope="session")
def reference_run(demo_prefix, tmp_path_factory):
    """(result of a straight 6-step single-rank run, its save dir with iter 3 and 6)."""
    out = tmp_path_factory.mktemp("ckpt_ref")
    save = str(out / "save")
    res = run_distributed(pretrain, 1, tiny_overrides(demo_prefix, str(out), save=save, save_interval=3))[0]
    return res, save


@pytest.fixture(scope="session")
def exported(reference_run, tmp_path_factory):
    """(megatron save dir, its Hugging Face export) of the reference run."""
    _, save = reference_run
    out = str(tmp_path_factory.mktemp("hf") / "export")
    run_distributed(convert, 1, "to_hf", save, out)
    return save, out
