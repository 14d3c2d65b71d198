"""kill -9 in the middle of a checkpoint save: the next start resumes from the last complete one."""
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from ckpt_workers import same_model, tiny_overrides
from distributed import free_port, run_distributed

from megatron_bluelm.training.checkpointing import META, SLOW_SAVE_ENV, iter_dir, read_latest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEP_RE = re.compile(r"step\s+(\d+)/\d+ \| loss (\S+)")


def _launch(args, env_extra=None):
    env = dict(os.environ, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONPATH=REPO, **(env_extra or {}))
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen([sys.executable, "-m", "megatron_bluelm.stages.pretrain", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_kill9_during_save_resumes_from_last_complete(reference_run, demo_prefix, tmp_path):
    ref, ref_save = reference_run
    save = str(tmp_path / "save")
    args = tiny_overrides(demo_prefix, str(tmp_path), save=save, load=save, save_interval=2)
    proc = _launch(args, {SLOW_SAVE_ENV: "4:120"})
    seen = []
    try:
        for line in proc.stdout:  # wait until the save of iteration 4 has written its tensors
            seen.append(line)
            if SLOW_SAVE_ENV in line:
                break
        else:
            pytest.fail("the run ended before the slowed save:\n" + "".join(seen))
        time.sleep(0.5)
        helpers = psutil.Process(proc.pid).children(recursive=True)  # megatron's writer Manager
        os.kill(proc.pid, signal.SIGKILL)
        for child in helpers:  # a real kill -9 leaves them orphaned too; the test cleans up its own
            child.kill()
    finally:
        proc.kill()
        proc.wait()
    assert read_latest(save) == 2
    assert os.path.isdir(iter_dir(save, 4)) and not os.path.exists(os.path.join(iter_dir(save, 4), META))

    out = _launch(args).communicate(timeout=600)[0]
    assert "ignoring incomplete checkpoint" in out and "resumed from" in out, out
    losses = [float(loss) for _, loss in STEP_RE.findall(out)]
    assert losses == [round(x, 4) for x in ref["losses"][2:]], out  # steps 3..6, nothing lost or repeated
    assert read_latest(save) == 6
    assert run_distributed(same_model, 1, save, ref_save)[0]
