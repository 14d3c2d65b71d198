"""bluelm-launch (megatron_bluelm/parallel/launch.py): torchrun whose worker failure ends in one line."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_error_under_the_launcher_is_two_lines(tmp_path):
    """A real 2-worker launch with a bad config key: the stage's one line (rank 0), the launcher's one
    line (failed ranks, exit codes), exit status 2; no traceback, no ChildFailedError report."""
    cmd = [sys.executable, "-m", "megatron_bluelm.parallel.launch", "--nproc-per-node", "2", "-m",
           "megatron_bluelm.stages.pretrain", "--config", os.path.join(REPO, "examples", "pretrain_tiny.yaml"),
           "--model.bogus", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 2 and lines[0] == "config error: unknown config key 'model.bogus'", lines
    # torchrun stops the other worker when the first fails: a slower rank may end by its SIGTERM
    status = "(exit code 2|signal SIGTERM)"
    assert re.fullmatch(rf"bluelm-launch: 2 worker\(s\) failed \(rank 0: {status}, rank 1: {status}\); the "
                        r"workers' own error is above", lines[1]), lines
    assert "exit code 2" in lines[1], lines


def test_success_exits_0(tmp_path):
    script = tmp_path / "ok.py"
    script.write_text("import os\nopen(f\"rank{os.environ['RANK']}\", 'w').close()\n")
    r = subprocess.run([sys.executable, "-m", "megatron_bluelm.parallel.launch", "--nproc-per-node", "2", str(script)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"),
                       cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "rank0").exists() and (tmp_path / "rank1").exists()
