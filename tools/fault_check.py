"""Fault injection for checkpoints: kill a real training run in many ways and check that it always
continues bit-identically to a run that was never interrupted.

    python tools/fault_check.py --cycles 12 --steps 16          # the long check (docs/CHECKPOINTS.md)
    python tools/fault_check.py --cycles 1 --steps 6 --only kill9   # what CI runs (tests/checkpoint)

Scenarios (all on the tiny preset, one process per run, gloo, CPU or GPU):
  kill9    N cycles of kill -9 after a random delay, inside a save (a test hook holds it open) or after
           a random step, of the trainer alone or of its whole process group, sync and async saves
           alternating: cycles 0, 1 mid-save (sync, async), trainer only; 2, 3 mid-step, whole group;
           4, 5 mid-save, whole group; 6, 7 mid-step, trainer only; and so on. After each kill: no
           writer process survives, ``latest`` names a complete, undamaged checkpoint, and the next
           start resumes from it.
  sigterm  SIGTERM to a torchrun agent (which forwards it to the worker's process group): the run
           saves at the next step end and exits; the next start resumes.
  corrupt  a truncated shard, a deleted .metadata, a truncated meta.json, a garbled common.pt: the
           resume fails with exit status 2 and a message naming the file.
  fulldisk a run under ``ulimit -f`` smaller than a shard: the save fails naming the file and the limit,
           ``latest`` stays; the next start (no limit) resumes.
After the kill9 / sigterm / fulldisk runs reach the last step, every step's loss in metrics.jsonl (full
precision) equals the uninterrupted run's, and so do the final weights (bitwise). Exit status 0 when
every check held; 1 with the failed checks listed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = ("kill9", "sigterm", "corrupt", "fulldisk")


def damage_file(target: str, damage: str) -> None:
    """Break one checkpoint file: ``delete`` it, ``truncate`` it to half, or ``garble`` 64 bytes in it."""
    if damage == "delete":
        os.remove(target)
    elif damage == "truncate":
        os.truncate(target, os.path.getsize(target) // 2)
    else:
        data = bytearray(open(target, "rb").read())
        data[len(data) // 3: len(data) // 3 + 64] = os.urandom(64)
        open(target, "wb").write(bytes(data))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Check:
    def __init__(self, args):
        self.args = args
        self.work = os.path.abspath(args.work)
        self.rng = random.Random(args.seed)
        self.failures: list[str] = []

    # -- running the stage

    def overrides(self, name: str, save: bool = True, async_save: bool = False) -> list[str]:
        out = os.path.join(self.work, name)
        args = ["--data.prefix", self.prefix, "--data.seq_length", "64", "--data.cache_dir",
                os.path.join(self.work, "cache"), "--training.train_steps", str(self.args.steps),
                "--training.eval_interval", "0", "--schedule.warmup_steps", "2", "--schedule.decay_steps",
                str(self.args.steps), "--logging.log_interval", "1", "--logging.tensorboard", "false",
                "--logging.output_dir", os.path.join(out, "log")]
        if save:
            args += ["--checkpoint.save", os.path.join(out, "save"), "--checkpoint.load", os.path.join(out, "save"),
                     "--checkpoint.save_interval", str(self.args.save_interval),
                     "--checkpoint.async_save", str(async_save).lower()]
        return args

    def launch(self, overrides, env_extra=None, torchrun=False, file_size_limit=None) -> subprocess.Popen:
        env = dict(os.environ, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONPATH=REPO,
                   **(env_extra or {}))
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            env.pop(key, None)
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"] if torchrun else []

        def limit():
            if file_size_limit:
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

        return subprocess.Popen([sys.executable, *launcher, "-m", "megatron_bluelm.stages.pretrain", *overrides],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=limit, start_new_session=True)

    def run(self, overrides, **kw) -> tuple[int, str]:
        proc = self.launch(overrides, **kw)
        out = proc.communicate(timeout=self.args.timeout)[0]
        return proc.returncode, out

    def expect(self, cond: bool, what: str, out: str = "") -> bool:
        if not cond:
            self.failures.append(what + (f"\n--- output tail ---\n{out[-3000:]}" if out else ""))
            print(f"  FAIL {what}", flush=True)
        return cond

    # -- state checks

    def save_dir(self, name: str) -> str:
        return os.path.join(self.work, name, "save")

    def check_latest(self, name: str, label: str) -> None:
        """``latest`` (if any) names a complete checkpoint whose files are all intact."""
        from megatron_bluelm.training.checkpointing import CheckpointError, resolve_checkpoint, verify_files

        save = self.save_dir(name)
        if not os.path.isdir(save):
            return
        try:
            path, _ = resolve_checkpoint(save)
            if path is not None:
                verify_files(path)
        except CheckpointError as e:
            self.expect(False, f"{label}: the checkpoint in force is damaged: {e}")

    def helpers_of(self, pid: int) -> list:
        import psutil

        try:
            return psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def check_no_survivors(self, helpers, label: str) -> None:
        import psutil

        def running(p) -> bool:
            try:
                return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:  # exited meanwhile
                return False

        deadline = time.time() + 15
        alive = helpers
        while alive and time.time() < deadline:
            alive = [p for p in alive if running(p)]
            time.sleep(0.2)
        for p in alive:  # clean up what the code under test failed to
            try:
                p.kill()
            except psutil.Error:
                pass
        self.expect(not alive, f"{label}: {len(alive)} writer process(es) outlived the killed run")

    def compare_with_reference(self, name: str, label: str) -> None:
        mine = self.logged_losses(name)
        self.expect(mine == self.ref_losses, f"{label}: losses {mine} differ from the uninterrupted run's "
                                             f"{self.ref_losses}")
        self.expect(self.same_weights(self.save_dir(name), self.save_dir("reference")),
                    f"{label}: final weights differ from the uninterrupted run's")

    def logged_losses(self, name: str) -> list:
        path = os.path.join(self.work, name, "log", "metrics.jsonl")
        records = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
        return [r["loss"] for r in records if r.get("split") == "train"]

    def same_weights(self, a: str, b: str) -> bool:
        """Bitwise equality of the newest complete checkpoints' weights (in a fresh process: loading
        needs a process group of its own)."""
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--compare", a, b], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=self.args.timeout)
        return out.stdout.strip().endswith("SAME")

    # -- scenarios

    def prepare(self) -> None:
        from megatron_bluelm.config.data import BUNDLED_TOKENIZER
        from megatron_bluelm.data.demo import DOCSTRINGS, PYTHON_DOCS
        from megatron_bluelm.data.preprocess import Options, preprocess

        os.makedirs(self.work, exist_ok=True)
        summary = preprocess(Options(inputs=[PYTHON_DOCS, DOCSTRINGS], output_prefix=os.path.join(self.work, "corpus"),
                                     tokenizer_model=BUNDLED_TOKENIZER, append_eod=True, workers=1, progress=False))
        self.prefix = summary.outputs[0]
        print(f"reference: {self.args.steps} uninterrupted steps", flush=True)
        code, out = self.run(self.overrides("reference"))
        if not self.expect(code == 0, "reference run failed", out):
            raise SystemExit(1)
        self.ref_losses = self.logged_losses("reference")

    def kill9(self) -> None:
        from megatron_bluelm.training.checkpointing import SLOW_SAVE_ENV, SLOW_WRITE_ENV, read_latest

        name, steps = "kill9", self.args.steps
        for cycle in range(self.args.cycles):
            async_save = cycle % 2 == 1
            latest = read_latest(self.save_dir(name)) if os.path.isdir(self.save_dir(name)) else None
            if latest is not None and latest >= steps:
                break
            start = (latest or 0) + 1
            # a save is held open for a while, so a kill can land inside it: the second one of this start
            # when there is room (a complete checkpoint from this start then precedes it), else the first
            next_save = ((start + self.args.save_interval - 1) // self.args.save_interval) * self.args.save_interval
            if next_save + self.args.save_interval < steps:
                next_save += self.args.save_interval
            hook = {(SLOW_WRITE_ENV if async_save else SLOW_SAVE_ENV): f"{next_save}:30"}
            kind = (cycle // 2) % 4  # the pattern of the module doc: 0 mid-save/trainer, 1 mid-step/group, ...
            mid_save = kind in (0, 2) and next_save < steps
            proc = self.launch(self.overrides(name, async_save=async_save), env_extra=hook if mid_save else None)
            target = self.rng.randint(start, steps)
            where = "mid-save" if mid_save else f"after step {target}"
            pattern = "test hook" if mid_save else rf"step\s+{target}/"
            seen, hit = [], False
            for line in proc.stdout:
                seen.append(line)
                if re.search(pattern, line):
                    hit = True
                    break
            if hit:
                time.sleep(self.rng.uniform(0.0, 0.5))
                helpers = self.helpers_of(proc.pid)
                # a scheduler kills the whole job; the OOM killer one process (its writers must then die with it)
                whole_group = kind in (1, 2)
                if whole_group:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    os.kill(proc.pid, signal.SIGKILL)
                where += ", whole process group" if whole_group else ", trainer only"
                proc.wait()
                self.check_no_survivors(helpers, f"kill9 cycle {cycle} ({where})")
            else:
                proc.wait()
                self.expect(proc.returncode == 0, f"kill9 cycle {cycle}: run failed", "".join(seen))
            mode = "async" if async_save else "sync"
            print(f"kill9 cycle {cycle}: {'killed ' + where if hit else 'finished'} ({mode} saves), "
                  f"latest now {read_latest(self.save_dir(name))}", flush=True)
            self.check_latest(name, f"kill9 cycle {cycle}")
        code, out = self.run(self.overrides(name))  # whatever is left, uninterrupted
        self.expect(code == 0, "kill9: the final resume failed", out)
        self.compare_with_reference(name, "kill9")

    def sigterm(self) -> None:
        from megatron_bluelm.training.checkpointing import read_latest

        name = "sigterm"
        target = self.rng.randint(2, self.args.steps - 1)
        proc = self.launch(self.overrides(name), torchrun=True)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if re.search(rf"step\s+{target}/", line):
                os.kill(proc.pid, signal.SIGTERM)  # the torchrun agent
                break
        out = "".join(seen) + proc.communicate(timeout=self.args.timeout)[0]
        saved = re.search(r"preemption signal: saved step (\d+)", out)
        if self.expect(saved is not None, "sigterm: no preemption save", out):
            self.expect(read_latest(self.save_dir(name)) == int(saved.group(1)),
                        "sigterm: latest is not the preemption save")
        print(f"sigterm at step {target}: {saved.group(0) if saved else 'no save'}", flush=True)
        code, out = self.run(self.overrides(name))
        self.expect(code == 0 and "resumed from" in out, "sigterm: the resume failed", out)
        self.compare_with_reference(name, "sigterm")

    def corrupt(self) -> None:
        from megatron_bluelm.training.checkpointing import LATEST, resolve_checkpoint

        src, _ = resolve_checkpoint(self.save_dir("reference"))
        cases = (("truncate", "__0_0.distcp"), ("delete", ".metadata"), ("truncate", "meta.json"),
                 ("garble", "common.pt"))
        for damage, file in cases:
            name = f"corrupt_{damage}_{file.strip('.').replace('.', '_')}"
            root = self.save_dir(name)
            shutil.rmtree(os.path.dirname(root), ignore_errors=True)
            shutil.copytree(src, os.path.join(root, os.path.basename(src)))
            open(os.path.join(root, LATEST), "w").write(str(int(os.path.basename(src)[5:])))
            target = os.path.join(root, os.path.basename(src), file)
            damage_file(target, damage)
            overrides = self.overrides(name, save=False) + ["--checkpoint.load", root]
            code, out = self.run(overrides)
            ok = code == 2 and file in out.split("config error:")[-1]  # the one-line error names the file
            self.expect(ok, f"corrupt {damage} {file}: expected exit 2 naming the file, got {code}", out)
            print(f"corrupt {damage} {file}: {'named' if ok else 'NOT named'}", flush=True)

    def fulldisk(self) -> None:
        from megatron_bluelm.training.checkpointing import read_latest

        name = "fulldisk"
        ref_dir = os.path.join(self.save_dir("reference"), f"iter_{self.args.steps:07d}")
        shards = [os.path.join(ref_dir, f) for f in os.listdir(ref_dir) if f.endswith(".distcp")]
        limit = max(map(os.path.getsize, shards)) // 4
        code, out = self.run(self.overrides(name), file_size_limit=limit)
        self.expect(code == 2 and "ulimit -f" in out and ".distcp reached that limit" in out,
                    f"fulldisk: expected exit 2 naming the file and the limit, got {code}", out)
        self.expect(read_latest(self.save_dir(name)) is None if os.path.isdir(self.save_dir(name)) else True,
                    "fulldisk: latest moved although the save failed")
        print(f"fulldisk (ulimit -f {limit} bytes): exit {code}", flush=True)
        code, out = self.run(self.overrides(name))
        self.expect(code == 0, "fulldisk: the run without the limit failed", out)
        self.compare_with_reference(name, "fulldisk")


def compare(a: str, b: str) -> bool:
    from megatron_bluelm.convert import megatron_io
    from megatron_bluelm.data.tokenizer import load_tokenizer
    from megatron_bluelm.training.checkpointing import read_meta, resolve_checkpoint

    megatron_io.start_single_process()
    states = []
    for root in (a, b):
        path, _ = resolve_checkpoint(root)
        cfg = megatron_io.run_config_from_meta(read_meta(path))
        vocab = cfg.model.vocab_size or load_tokenizer(cfg.data.tokenizer_model).vocab_size
        states.append(megatron_io.load_full(megatron_io.build_model(cfg, vocab), path))
    import torch

    return states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--compare"]:
        sys.path.insert(0, REPO)
        print("SAME" if compare(sys.argv[2], sys.argv[3]) else "DIFFERENT")
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=12, help="kill -9 cycles")
    ap.add_argument("--steps", type=int, default=16, help="training steps of every run")
    ap.add_argument("--save-interval", type=int, default=2)
    ap.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    ap.add_argument("--seed", type=int, default=0, help="chooses the kill moments")
    ap.add_argument("--work", default="outputs/fault_check", help="scratch directory (emptied first)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    args = ap.parse_args(argv)
    if args.steps < 3:
        ap.error("--steps must be >= 3")
    shutil.rmtree(args.work, ignore_errors=True)
    sys.path.insert(0, REPO)
    check = Check(args)
    t0 = time.time()
    check.prepare()
    for scenario in args.only:
        getattr(check, scenario)()
    print(f"fault_check: {len(check.failures)} failure(s) in {time.time() - t0:.0f}s "
          f"({', '.join(args.only)}; {args.cycles} kill -9 cycles, seed {args.seed})", flush=True)
    for failure in check.failures:
        print("FAILED:", failure)
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
