"""The tiny multimodal model trains on the demo images: TP2 x PP2 is the 1-rank model (same losses and
parameters), the loss falls; freezing and the text -> multimodal checkpoint carry-over work."""
import pytest
import torch
from distributed import phase, phases, run_distributed
from mm_workers import overrides, train_mm, train_text

STEPS = 4
TOL = dict(rtol=1e-5, atol=2e-5)


@pytest.fixture(scope="module")
def baseline(mm_prefix, tmp_path_factory):
    return run_distributed(train_mm, 1, overrides(mm_prefix, str(tmp_path_factory.mktemp("mm1")), STEPS))[0]


@pytest.mark.slow
def test_tp2_pp2_matches_single_rank_and_loss_falls(baseline, mm_prefix, tmp_path):
    losses = baseline["losses"]
    assert losses[-1] < losses[0] - 0.1, f"loss did not fall: {losses}"
    extra = ["--parallel.tp", "2", "--parallel.pp", "2"]
    results = run_distributed(train_mm, 4, overrides(mm_prefix, str(tmp_path), STEPS, extra))
    torch.testing.assert_close(torch.tensor(results[-1]["losses"]), torch.tensor(losses), **TOL)
    params = results[0]["params"]
    assert params.keys() == baseline["params"].keys()
    assert any(k.startswith("vision_model.decoder.layers.1.") for k in params)  # the ViT was gathered
    for name, ref in baseline["params"].items():
        torch.testing.assert_close(params[name], ref, **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_text_checkpoint_initializes_decoder_and_freezing_holds(mm_prefix, demo_prefix, tmp_path):
    """Stage 1 from a text checkpoint: the frozen decoder and ViT stay exactly as loaded / initialized,
    only the adapter changes."""
    ckpt = str(tmp_path / "text_ckpt")
    text_args = ["--data.prefix", demo_prefix, "--data.seq_length", "64", "--model.preset", "tiny",
                 "--training.train_steps", "1", "--training.micro_batch_size", "1",
                 "--training.global_batch_size", "2", "--training.eval_interval", "0",
                 "--schedule.warmup_steps", "0", "--logging.output_dir", str(tmp_path / "t"),
                 "--logging.tensorboard", "false", "--checkpoint.save", ckpt, "--data.cache_dir", str(tmp_path / "c")]
    text = run_distributed(train_text, 1, text_args)[0]["params"]
    stage1 = ["--vision.freeze", "vision,decoder", "--parallel.pp", "2"]
    # both PP2 runs in one start of the 2 ranks (one layout; each run has its own process group)
    before, after = (r["params"] for r in run_distributed(phases, 2, [
        phase(train_mm, overrides(mm_prefix, str(tmp_path / "a"), 1, stage1 + [
            "--optimizer.lr", "0", "--optimizer.min_lr", "0"]), ckpt),
        phase(train_mm, overrides(mm_prefix, str(tmp_path / "b"), 2, stage1), ckpt)])[0])
    for name, value in text.items():  # the decoder is the text model's
        torch.testing.assert_close(after[f"language_model.{name}"], value, rtol=0, atol=0)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed and all(n.startswith("adapter.") for n in changed), sorted(changed)
