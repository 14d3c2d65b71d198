"""Faults a checkpoint must survive: stale shards under overlap_param_gather, preemption through
torchrun, NaN gradients, unwritable / full disks, damaged files, an optimizer switch, a growing run's
data order; async saves (kill -9 mid-write: test_crash.py)."""
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from ckpt_workers import (
    loaded_loss,
    pretrain,
    pretrain_nan_grad,
    pretrain_phases,
    pretrain_synced,
    tiny_overrides,
)
from distributed import free_port, run_distributed

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.schema import RunConfig
from megatron_bluelm.training.checkpointing import (
    META,
    SLOW_SAVE_ENV,
    SLOW_WRITE_ENV,
    Checkpointer,
    CheckpointError,
    adopt_sample_count,
    iter_dir,
    read_latest,
    read_meta,
    verify_files,
)
from tools.fault_check import damage_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEP_RE = re.compile(r"step\s+(\d+)/\d+ \| loss (\S+)")


def launch(args, env_extra=None, torchrun=False, file_size_limit=None):
    """The pretrain stage in a child process (directly, or under torchrun with one worker)."""
    env = dict(os.environ, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONPATH=REPO, **(env_extra or {}))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"] if torchrun else []

    def limit():
        if file_size_limit:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.Popen([sys.executable, *launcher, "-m", "megatron_bluelm.stages.pretrain", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=limit, start_new_session=True)


def read_until(proc, pattern: str, seen: list) -> None:
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return
    pytest.fail(f"the run ended before /{pattern}/:\n" + "".join(seen))


def losses_of(out: str) -> list[float]:
    return [float(loss) for _, loss in STEP_RE.findall(out)]


def logged_train(log_dir) -> list[dict]:
    """metrics.jsonl's training records (full-precision losses)."""
    return [r for r in map(json.loads, open(os.path.join(log_dir, "metrics.jsonl"))) if r["split"] == "train"]


# ----------------------------------------------------------------------------- stale weights

def test_overlap_param_gather_checkpoint_holds_the_current_weights(demo_prefix, tmp_path):
    """DP2, distributed optimizer, both overlaps: the checkpoint's weights, loaded alone, equal bit for
    bit the weights the ranks hold once their pending all-gather is done (not the previous step's;
    without the save's finish_param_gather 14 of the 27 tensors are)."""
    save = str(tmp_path / "save")
    args = tiny_overrides(demo_prefix, str(tmp_path), steps=2, distopt=True, save=save) + [
        "--parallel.overlap_grad_reduce", "true", "--parallel.overlap_param_gather", "true"]
    res = run_distributed(pretrain_synced, 2, args)[0]
    live, saved = res["live"], res["saved"]
    assert set(live) <= set(saved)
    stale = [name for name in live if not torch.equal(live[name], saved[name])]
    assert not stale, f"{len(stale)} of {len(live)} tensors differ from the weights in memory, e.g. {stale[:3]}"


# ----------------------------------------------------------------------------- preemption

def test_sigterm_through_torchrun_saves_and_resumes_exactly(reference_run, demo_prefix, tmp_path):
    """torchrun forwards SIGTERM to the worker's whole process group, checkpoint writer helpers
    included: the preemption save still completes, and the resumed run continues bit-identically.
    Also: the step after a (slowed) save reports its own time, and metrics.jsonl holds every step once."""
    ref, _ = reference_run
    save = str(tmp_path / "save")
    args = tiny_overrides(demo_prefix, str(tmp_path), save=save, load=save, save_interval=2)
    proc = launch(args, {SLOW_SAVE_ENV: "2:4"}, torchrun=True)
    seen = []
    try:
        read_until(proc, SLOW_SAVE_ENV, seen)  # the save of step 2 has started its writer helpers
        os.kill(proc.pid, signal.SIGTERM)  # to the torchrun agent, as a scheduler preempting the job
        out = "".join(seen) + proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert "preemption signal: saved step 3" in out, out
    assert read_latest(save) == 3
    out2 = launch(args).communicate(timeout=300)[0]
    assert "resumed from" in out2, out2
    train = logged_train(tmp_path / "log")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]  # appended on resume, not truncated
    assert [r["loss"] for r in train] == ref["losses"], out + out2  # bit-identical continuation
    step3 = next(r for r in train if r["step"] == 3)
    assert step3["step_time_s"] < 2.0, step3  # the 4 s pause inside step 2's save is not step 3's time
    assert "mem_gib" not in step3 and "skipped" not in step3  # no constant noise on CPU


# ----------------------------------------------------------------------------- NaN gradients

def test_nan_gradient_stops_without_saving_the_step(demo_prefix, tmp_path):
    """Default policy: a NaN gradient at a save step stops the run; the step is neither applied nor
    saved, `latest` stays at the previous checkpoint."""
    save = str(tmp_path / "save")
    args = tiny_overrides(demo_prefix, str(tmp_path), save=save, save_interval=2)
    with pytest.raises(RuntimeError, match=r"step 4: gradient norm nan.*not applied.*not saved"):
        run_distributed(pretrain_nan_grad, 1, args, 4)
    assert read_latest(save) == 2 and not os.path.exists(iter_dir(save, 4))


def test_nan_gradient_skipped_and_counted(reference_run, demo_prefix, tmp_path):
    """nan_policy skip: the NaN step is dropped (weights, Adam state and LR schedule untouched), counted,
    and the run goes on with finite weights."""
    ref, _ = reference_run
    args = tiny_overrides(demo_prefix, str(tmp_path)) + ["--training.nan_policy", "skip"]
    res = run_distributed(pretrain_nan_grad, 1, args, 4)[0]
    assert res["step"] == 6 and res["losses"][:4] == ref["losses"][:4]
    assert all(torch.isfinite(p).all() for p in res["params"].values())
    assert res["losses"][4] != ref["losses"][4]  # step 5 starts from the step-3 weights
    assert [r["skipped_steps"] for r in logged_train(tmp_path / "log")] == [0, 0, 0, 1, 1, 1]


# ----------------------------------------------------------------------------- disks

def test_unwritable_save_dir_fails_before_training(tmp_path):
    (tmp_path / "a_file").write_text("x")
    cfg = RunConfig()
    cfg.checkpoint.save = str(tmp_path / "a_file" / "ckpt")
    with pytest.raises(CheckpointError, match=r"checkpoint.save: cannot write to '.*a_file/ckpt'"):
        Checkpointer(SimpleNamespace(cfg=cfg, logger=SimpleNamespace(print=print)))


def test_full_disk_mid_save_is_reported_by_name(demo_prefix, tmp_path):
    """A write that fails mid-save (here: `ulimit -f`, as a full disk would) names the checkpoint, the
    file and the cause; the directory stays incomplete and `latest` does not move."""
    save = str(tmp_path / "save")
    args = tiny_overrides(demo_prefix, str(tmp_path), steps=2, save=save)
    proc = launch(args, file_size_limit=2 * 2**20)  # the dataset cache and logs fit, the 16 MB shards do not
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, out
    assert re.search(r"writing checkpoint '.*iter_0000002' failed on rank 0 .*file-size limit \(ulimit -f\) is "
                     r"2097152 bytes; .*iter_0000002/__0_\d\.distcp reached that limit", out), out
    assert read_latest(save) is None and not os.path.exists(os.path.join(iter_dir(save, 2), META))


# ----------------------------------------------------------------------------- damaged files

@pytest.mark.parametrize("damage, file, message", [
    ("truncate", "__0_0.distcp", r"__0_0.distcp is truncated: \d+ bytes, .metadata needs \d+"),
    ("delete", ".metadata", r"/.metadata is missing"),
    ("truncate", "common.pt", r"common.pt is damaged"),
    ("garble", "common.pt", r"common.pt is damaged"),
    ("truncate", "meta.json", r"meta.json is damaged \(not valid JSON"),
])
def test_damaged_files_are_named(reference_run, tmp_path, damage, file, message):
    _, ref_save = reference_run
    path = str(tmp_path / "iter_0000003")
    shutil.copytree(iter_dir(ref_save, 3), path)
    target = os.path.join(path, file)
    damage_file(target, damage)
    with pytest.raises(CheckpointError, match=message):
        read_meta(path)
        verify_files(path)


DAMAGED_LOADS = [("truncate", "__0_1.distcp", r"__0_1.distcp is truncated: \d+ bytes, .metadata needs \d+"),
                 ("garble", "common.pt", r"iter_0000003/common.pt is damaged")]


def _damaged_copy(ref_save: str, tmp_path, damage: str, file: str) -> str:
    path = str(tmp_path / "ckpt" / "iter_0000003")
    shutil.copytree(iter_dir(ref_save, 3), path)
    damage_file(os.path.join(path, file), damage)
    open(tmp_path / "ckpt" / "latest", "w").write("3")
    return path


@pytest.mark.parametrize("damage, file, message", DAMAGED_LOADS)
def test_damaged_checkpoint_is_named_by_hf_export(reference_run, tmp_path, damage, file, message):
    """The HF export checks the files before it builds the model (megatron-core would fail naming none)."""
    from megatron_bluelm.convert.api import megatron_to_hf

    path = _damaged_copy(reference_run[1], tmp_path, damage, file)
    with pytest.raises(CheckpointError, match=message):
        megatron_to_hf(path, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")


@pytest.mark.parametrize("damage, file, message", DAMAGED_LOADS)
def test_damaged_checkpoint_is_named_by_the_inference_loader(reference_run, tmp_path, damage, file, message):
    """The weights loader of generation, evaluation and --pretrained checks the files first (it fails
    before it touches the model chunks, so none are needed here)."""
    from megatron_bluelm.inference.loading import load_weights

    path = _damaged_copy(reference_run[1], tmp_path, damage, file)
    with pytest.raises(CheckpointError, match=message):
        load_weights([], os.path.dirname(path))


def test_damaged_shard_fails_the_resume_by_name(reference_run, demo_prefix, tmp_path):
    _, ref_save = reference_run
    root = str(tmp_path / "ckpt")
    shutil.copytree(iter_dir(ref_save, 3), iter_dir(root, 3))
    open(os.path.join(root, "latest"), "w").write("3")
    shard = os.path.join(iter_dir(root, 3), "__0_1.distcp")
    os.truncate(shard, 100)
    with pytest.raises(RuntimeError, match=r"__0_1.distcp is truncated: 100 bytes"):
        run_distributed(loaded_loss, 1, tiny_overrides(demo_prefix, str(tmp_path), load=root))


# ----------------------------------------------------------------------------- layouts and config

def assert_continues(res: dict, ref: dict, start: int, params: bool = True):
    """A run resumed at step ``start`` continues like the straight reference run: losses (the first
    one after a resume only checks the weights; the later ones, and the final weights, the Adam state)."""
    torch.testing.assert_close(res["losses"], ref["losses"][start:start + len(res["losses"])], rtol=1e-6, atol=0)
    if params:
        for name, value in ref["params"].items():
            torch.testing.assert_close(res["params"][name], value, rtol=0, atol=2e-6, msg=name)


def test_optimizer_switches_on_resume(reference_run, demo_prefix, tmp_path):
    """Switching parallel.distributed_optimizer on resume carries the Adam state over. DP2: distributed
    for 3 steps -> plain for 2 -> distributed for the last; and that first checkpoint into one rank with
    the plain optimizer. Each continues like the straight single-rank run (with the moments zeroed on
    load: step 5's loss 9e-3 off, weights 7e-4)."""
    ref, _ = reference_run
    first, second = str(tmp_path / "dist"), str(tmp_path / "plain")

    def phase(name, steps, distopt, save=None, load=None):
        return (tiny_overrides(demo_prefix, str(tmp_path / name), steps=steps, distopt=distopt, save=save,
                               load=load) + ["--training.train_samples", "48"], free_port())

    dp2 = run_distributed(pretrain_phases, 2, [phase("a", 3, True, save=first),
                                               phase("b", 5, False, save=second, load=first),
                                               phase("c", 6, True, load=second)])[0]
    assert [r["step"] for r in dp2] == [3, 5, 6]
    assert_continues(dp2[0], ref, 0, params=False)
    assert_continues(dp2[1], ref, 3, params=False)
    assert_continues(dp2[2], ref, 5)
    one = run_distributed(pretrain, 1, phase("d", 6, False, load=first)[0])[0]
    assert_continues(one, ref, 3)


def test_optimizer_switch_reads_the_step_of_every_common_layout():
    """The Adam step a switch restores, from each optimizer's common.pt entry (as megatron-core 0.16.1
    writes them): plain fp32, plain bf16, distributed, chained; none or disagreeing ones are refused."""
    from megatron_bluelm.training.checkpointing import _saved_adam_step

    groups = [{"wd_mult": 1.0, "lr": 1e-4}, {"wd_mult": 0.0, "lr": 1e-4}]
    plain = {"state": {"common_step": torch.tensor(7.0)}, "param_groups": groups}
    distributed = {"optimizer": {"param_groups": [{**g, "step": 7.0} for g in groups]},
                   "param_state_sharding_type": "fully_reshardable"}
    for common in (plain, {"optimizer": plain}, distributed, {0: distributed, 1: distributed}):
        assert _saved_adam_step(common) == 7.0
    bad = {0: plain, 1: {"state": {"common_step": torch.tensor(6.0)}, "param_groups": groups}}
    for common in ({"param_groups": groups}, bad):
        with pytest.raises(CheckpointError, match="common.pt holds (no|several) optimizer step counts"):
            _saved_adam_step(common)


def test_zero_layer_pipeline_stage_is_rejected():
    from megatron_bluelm.config.validate import validate

    for first, last in ((0, None), (None, 0), (2, 2)):
        cfg = RunConfig()
        cfg.model.num_layers, cfg.parallel.pp = 4, 3
        cfg.parallel.first_stage_layers, cfg.parallel.last_stage_layers = first, last
        with pytest.raises(ConfigError, match=r"pipeline stage\(s\) \[\d\] would hold no decoder layer"):
            validate(cfg, 3)


# ----------------------------------------------------------------------------- data order

def test_train_samples_fixes_the_data_order(demo_prefix, tmp_path):
    """megatron-core shuffles for the number of samples asked for: at seq 1024 a 50-step run and a
    100-step run see different first batches. With training.train_samples fixed they see the same,
    and a resume adopts the checkpoint's count (or warns by name when it must grow)."""
    from megatron_bluelm.data import build_pretrain_datasets, load_tokenizer
    from megatron_bluelm.training.loop import sample_counts

    def first_samples(steps, train_samples=None, n=200):
        cfg = RunConfig()
        cfg.data.prefix, cfg.data.seq_length, cfg.data.cache_dir = demo_prefix, 1024, str(tmp_path / "cache")
        cfg.training.train_steps, cfg.training.train_samples = steps, train_samples
        ds = build_pretrain_datasets(cfg.data, load_tokenizer(cfg.data.tokenizer_model), seq_length=1024,
                                     num_samples=sample_counts(cfg), seed=cfg.training.seed)[0]
        return [ds[i]["tokens"][:16].tolist() for i in range(n)]

    assert first_samples(50) != first_samples(100)  # the problem: the order depends on train_steps
    assert first_samples(50, train_samples=800) == first_samples(100, train_samples=800)

    cfg, notes = RunConfig(), []
    cfg.training.train_steps = 50
    adopt_sample_count(cfg, {"train_samples": 800, "consumed_samples": 200}, notes.append)
    assert cfg.training.train_samples == 800 and not notes  # the resumed run keeps the saved order
    cfg.training.train_steps, cfg.training.train_samples = 200, None
    adopt_sample_count(cfg, {"train_samples": 800, "consumed_samples": 200}, notes.append)
    assert "built for 1600 samples" in notes[0] and "training.train_samples" in notes[0]


# ----------------------------------------------------------------------------- async save

def test_async_save_trains_on_while_writing(reference_run, demo_prefix, tmp_path):
    """checkpoint.async_save: training goes on while step 4's writer is held; `latest` moves to 4 only
    once that write is complete; the run equals the blocking-save run bit for bit. (kill -9 during an
    async write: test_crash.py.)"""
    ref, _ = reference_run
    save = str(tmp_path / "save")
    args = tiny_overrides(demo_prefix, str(tmp_path), save=save, save_interval=2) + ["--checkpoint.async_save", "true"]
    proc = launch(args, {SLOW_WRITE_ENV: "4:3"})
    seen = []
    try:
        read_until(proc, SLOW_WRITE_ENV, seen)  # the writer of step 4 is paused before writing
        read_until(proc, r"step\s+5/6", seen)  # ... and training went on meanwhile
        assert read_latest(save) == 2
        out = "".join(seen) + proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert out.index("step      5/6") < out.index("saved checkpoint " + iter_dir(save, 4)), out
    # The host buffers were reserved in the background after step 1, in time for the first save, and
    # served every save without growing.
    assert out.index("checkpoint host buffers ready") < out.index("saving checkpoint " + iter_dir(save, 2)), out
    assert "host buffers grew" not in out, out
    assert read_latest(save) == 6
    assert [r["loss"] for r in logged_train(tmp_path / "log")] == ref["losses"]  # bit-identical


# ----------------------------------------------------------------------------- logs across resumes

def test_logger_continues_a_resumed_run(tmp_path, monkeypatch):
    """metrics.jsonl: a fresh run starts it empty, a resumed one keeps the records up to its step
    (a torn last line dropped) and appends; wandb is resumed under the id saved with the run."""
    from megatron_bluelm.training.logging import RunLogger

    inits = []
    fake = SimpleNamespace(init=lambda **kw: inits.append(kw) or SimpleNamespace(log=lambda *a, **k: None,
                                                                                 finish=lambda: None),
                           util=SimpleNamespace(generate_id=lambda: f"id{len(inits)}"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = RunConfig()
    cfg.logging.output_dir, cfg.logging.tensorboard, cfg.logging.wandb = str(tmp_path), False, True

    def session(start, steps):
        logger = RunLogger(cfg, enabled=True, run_config={})
        logger.begin(start)
        for step in steps:
            logger.log(step, {"loss": float(step)})
        logger.close()

    session(0, [1, 2, 3, 4])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "spl')  # killed mid-write
    session(3, [4, 5])  # resumed from the step-3 checkpoint
    assert [r["step"] for r in logged_train(tmp_path)] == [1, 2, 3, 4, 5]
    assert inits[0]["id"] == inits[1]["id"] and inits[1]["resume"] == "allow"
    session(0, [1])  # a fresh run in the same directory: new file, new wandb run
    assert [r["step"] for r in logged_train(tmp_path)] == [1] and inits[2]["id"] != inits[0]["id"]
