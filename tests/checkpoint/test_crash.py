"""kill -9 of a real run in the middle of a save, sync and async, of the trainer alone or of its whole
process group: no checkpoint writer outlives it, `latest` names an intact checkpoint, and the next start
continues bit-identically (losses and weights) to an uninterrupted run. The CI-sized run of
tools/fault_check.py (its long form and other scenarios: docs/CHECKPOINTS.md)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_kill9_mid_save_sync_and_async_continues_exactly(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, os.path.join(REPO, "tools", "fault_check.py"), "--cycles", "2", "--steps", "6",
           "--only", "kill9", "--work", str(tmp_path / "fc")]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    log = out.stdout + out.stderr[-3000:]
    assert out.returncode == 0 and "fault_check: 0 failure(s)" in out.stdout, log
    assert "kill9 cycle 0: killed mid-save" in out.stdout and "(sync saves), latest now 2" in out.stdout, log
    assert "kill9 cycle 1: killed mid-save" in out.stdout and "(async saves), latest now 2" in out.stdout, log
