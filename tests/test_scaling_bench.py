"""The scaling benchmark's layout grammar and the overrides it hands to the trainer."""
import importlib.util
import os

import pytest

from megatron_bluelm.config.loader import load_config
from megatron_bluelm.config.validate import validate

_PATH = os.path.join(os.path.dirname(__file__), "..", "tools", "bench", "scaling_bench.py")
_spec = importlib.util.spec_from_file_location("scaling_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("name,world,tp,pp,vpp", [
    ("1gpu", 1, 1, 1, None), ("dp4", 4, 1, 1, None), ("tp2-pp2", 4, 2, 2, None),
    ("pp4-vpp7", 4, 1, 4, 7), ("tp2-dp2+sp", 4, 2, 1, None),
])
def test_layouts_validate_as_configs(name, world, tp, pp, vpp):
    layout = bench.parse_layout(name)
    assert bench.world_size(layout) == world
    args = bench.argparse.Namespace(preset="bluelm-2.5-3b", seq=4096, mbs=1, microbatches=8, steps=4,
                                    recompute="none", vocab=100_000)
    cfg = load_config(None, bench.overrides(layout, args))
    dp = validate(cfg, world_size=world)
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp) == (tp, pp, vpp)
    assert cfg.training.global_batch_size == cfg.training.micro_batch_size * dp * (8 * (pp if vpp else 1))
    assert cfg.parallel.sequence_parallel == name.endswith("+sp")
    assert cfg.parallel.distributed_optimizer == (dp > 1)


def test_invalid_layout_is_reported_not_launched():
    args = bench.argparse.Namespace(preset="bluelm-2.5-3b", seq=4096, mbs=1, microbatches=8, steps=4,
                                    recompute="none", vocab=100_000, timeout=1)
    r = bench.run_layout("pp4-vpp2", args)
    assert "not divisible by parallel.vpp (2)" in r["skipped"]


def test_failed_run_reports_the_workers_exception_not_torchruns():
    _error_line = bench._error_line
    log = """[rank0]: Traceback (most recent call last):
[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 336.00 MiB.
E1123 torch/distributed/elastic/multiprocessing/api.py:986] failed (exitcode: 1) local_rank: 0
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
"""
    assert _error_line(log).startswith("[rank0]: torch.OutOfMemoryError: CUDA out of memory")
    assert _error_line("nothing here") == "failed (no exception in the log)"


@pytest.mark.slow
def test_multimodal_bench_runs_on_gloo_and_tp2_trains_the_same_model(tmp_path):
    """--vision: the multimodal stage on the bundled images under each layout (gloo CPU ranks): TP2
    has the same global batch as 1 GPU, so the same losses. (Sequence parallelism with the multimodal
    model: tests/multimodal/test_mm_packing.py.)"""
    import json

    out = tmp_path / "mm.json"
    bench.main(["--cpu", "--gpus", "2", "--preset", "tiny", "--vision", "vit-tiny", "--max-tiles", "2",
                "--seq", "192", "--mbs", "2", "--microbatches", "2", "--steps", "2", "--vocab", "0",
                "--layouts", "1gpu,tp2", "--out", str(out)])
    res = {r["layout"]: r for r in json.load(open(out))["results"]}
    assert res["1gpu"]["tokens_per_s_per_gpu"] > 0 and res["tp2"]["tokens_per_s_per_gpu"] > 0
    assert res["tp2"]["loss"] == pytest.approx(res["1gpu"]["loss"], rel=1e-5)


@pytest.mark.parametrize("n,grid", [(6, (2, 3)), (4, (2, 2)), (2, (1, 2)), (5, (1, 5)), (9, (3, 3)), (1, (1, 1))])
def test_multimodal_bench_images_fill_the_whole_tile_grid(n, grid):
    assert bench.bench_grid(n) == grid
