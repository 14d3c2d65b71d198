"""Bad input: a clear file:line message under --on-error fail; counted, never lost, under skip."""
import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jsonl_files import write_jsonl
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.data import preprocess as pp
from megatron_bluelm.data.jsonl import InputError
from megatron_bluelm.data.preprocess import Options, preprocess

TOOL = str(Path(__file__).resolve().parents[2] / "tools" / "preprocess_data.py")
GOOD = {"text": "a good document"}
CASES = [  # (line 2 of the file, expected message fragment, summary kind)
    ('{"text": "unterminated', "malformed JSON", "malformed JSON"),
    ({"body": "no text key"}, "missing key 'text'", "missing key 'text'"),
    (b'{"text": "caf\xe9"}', "not valid UTF-8: byte 0xe9", "not valid UTF-8"),
    ({"text": "   "}, "empty document", "empty document"),
    ("", "blank line", "blank line"),
    ('["a list"]', "not a JSON object", "not a JSON object"),
    ({"text": 5}, "key 'text' is not a string", "key 'text' is not a string"),
    ({"text": "x" * 5000}, "line too long: 5013 bytes", "line too long"),
]


def _opts(path, prefix, tok, **kw):
    kw.setdefault("max_line_bytes", 4096)
    return Options(inputs=[path], output_prefix=str(prefix), tokenizer_model=tok, progress=False, **kw)


@pytest.mark.parametrize("bad,message,kind", CASES, ids=[c[2] for c in CASES])
@pytest.mark.parametrize("workers", [1, 2])
def test_fail_policy_names_file_and_line(tmp_path, tokenizer_path, bad, message, kind, workers):
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(InputError) as e:
        preprocess(_opts(path, tmp_path / "o", tokenizer_path, workers=workers))
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)
    assert (e.value.path, e.value.lineno) == (path, 2)
    assert not list(tmp_path.glob("o_*"))  # nothing written, not even temporaries


def test_skip_policy_counts_every_bad_line(tmp_path, tokenizer_path, sp):
    lines = [GOOD] + [c[0] for c in CASES] + [{"text": "last one"}]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    s = preprocess(_opts(path, tmp_path / "o", tokenizer_path, on_error="skip", append_eod=True))
    assert s.lines == len(lines)
    assert s.documents == 2
    assert dict(s.skipped) == {c[2]: 1 for c in CASES}
    assert s.documents + sum(s.skipped.values()) == s.lines  # nothing silently lost
    assert f"{path}:3: missing key 'text'" in "\n".join(s.examples)
    ds = IndexedDataset(s.outputs[0])
    assert [ds[i].tolist() for i in range(2)] == [sp.encode(t) + [3] for t in ("a good document", "last one")]
    report = s.format()
    assert "skipped lines: 8" in report and "1 x malformed JSON" in report


def test_setup_errors_name_the_flag(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    with pytest.raises(ConfigError, match="--tokenizer-model: no such file"):
        preprocess(_opts(path, tmp_path / "o", str(tmp_path / "missing.model")))
    with pytest.raises(ConfigError, match="--input: no such file"):
        preprocess(_opts(str(tmp_path / "nope.jsonl"), tmp_path / "o", tokenizer_path))
    with pytest.raises(ConfigError, match="--on-error: must be 'fail' or 'skip'"):
        preprocess(_opts(path, tmp_path / "o", tokenizer_path, on_error="ignore"))


def test_read_only_output_dir(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(ConfigError, match="--output-prefix: directory .* is not writable"):
            preprocess(_opts(path, ro / "o", tokenizer_path))
    finally:
        ro.chmod(0o700)


def test_unwritable_output_as_root_too(tmp_path, tokenizer_path):
    # a path *under a regular file* cannot be created even by root
    (tmp_path / "file").write_text("x")
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    with pytest.raises(ConfigError, match="--output-prefix: cannot create directory"):
        preprocess(_opts(path, tmp_path / "file" / "sub" / "o", tokenizer_path))


def test_cli_reports_error_with_exit_code(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD, "{bad"])
    r = subprocess.run([sys.executable, TOOL, "--input", path, "--output-prefix", str(tmp_path / "o"),
                        "--tokenizer-model", tokenizer_path, "--no-progress"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and f"error: {path}:2: malformed JSON" in r.stderr


def test_exception_mid_run_leaves_no_index(tmp_path, tokenizer_path, monkeypatch):
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD] * 2000)
    calls = []

    def boom(self, *a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if Ctrl-C arrived mid-write
        return real_add(self, *a)

    real_add = pp.IndexedWriter.add
    monkeypatch.setattr(pp.IndexedWriter, "add", boom)
    with pytest.raises(KeyboardInterrupt):
        preprocess(_opts(path, tmp_path / "o", tokenizer_path, chunk_bytes=1000))
    assert os.listdir(tmp_path) == ["in.jsonl"]


@pytest.mark.slow
def test_killed_process_leaves_no_valid_index(tmp_path, tokenizer_path):
    # An old, complete output exists; a new run is SIGKILLed mid-write: the old pair stays intact
    # (never a new .bin beside an old .idx), and no .idx for the new data appears.
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": "word " * 200}] * 60000)
    prefix = tmp_path / "o"
    cmd = [sys.executable, TOOL, "--input", big, "--output-prefix", str(prefix),
           "--tokenizer-model", tokenizer_path, "--no-progress", "--chunk-bytes", "65536"]
    small = write_jsonl(tmp_path / "small.jsonl", [GOOD])
    subprocess.run(cmd[:3] + [small] + cmd[4:], check=True, capture_output=True)
    old_bin = (tmp_path / "o_text_document.bin").read_bytes()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not any(".bin.tmp-" in n and os.path.getsize(tmp_path / n) > 0 for n in os.listdir(tmp_path)):
        assert time.time() < deadline and p.poll() is None, "writer never started"
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (tmp_path / "o_text_document.bin").read_bytes() == old_bin
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert len(ds) == 1


# ---- compressed input that ends early or is corrupt: always an error (never a shorter dataset) -----

def _docs(n):
    return b"".join(b'{"text": "document number %d"}\n' % i for i in range(n))


def _truncated_zst(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    data = zstandard.ZstdCompressor().compress(_docs(20000))
    path = tmp_path / "in.jsonl.zst"
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _truncated_gz(tmp_path):
    data = gzip.compress(_docs(20000))
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _corrupt_gz(tmp_path):
    data = bytearray(gzip.compress(_docs(20000)))
    data[len(data) // 2: len(data) // 2 + 64] = b"\x00" * 64
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(bytes(data))
    return str(path)


def _run_tool(*args, **kw):
    return subprocess.run([sys.executable, TOOL, *args, "--no-progress"], capture_output=True, text=True,
                          check=False, **kw)


@pytest.mark.parametrize("make,kind", [(_truncated_zst, "zstd"), (_truncated_gz, "gzip"), (_corrupt_gz, "gzip")],
                         ids=["truncated-zst", "truncated-gz", "corrupt-gz"])
@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_truncated_or_corrupt_compressed_input_is_an_error(tmp_path, tokenizer_path, make, kind, policy):
    path = make(tmp_path)
    r = _run_tool("--input", path, "--output-prefix", str(tmp_path / "o"), "--tokenizer-model", tokenizer_path,
                  "--on-error", policy)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: {path}:") and f"cannot read the {kind} data" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "malformed JSON" not in r.stderr
    assert not list(tmp_path.glob("o_*"))


def test_concatenated_zstd_frames_read_whole(tmp_path, tokenizer_path):
    zstandard = pytest.importorskip("zstandard")
    docs = _docs(3000)
    path = tmp_path / "in.jsonl.zst"
    frames = [zstandard.ZstdCompressor().compress(part) for part in (docs[:1000], docs[1000:])]
    path.write_bytes(b"".join(frames))
    s = preprocess(_opts(str(path), tmp_path / "o", tokenizer_path))
    assert s.documents == 3000


def test_lone_surrogate_is_a_bad_line(tmp_path, tokenizer_path):
    lines = [GOOD, '{"text": "broken \\ud800 escape"}', '{"text": "pair \\ud83d\\ude00 ok"}']
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    with pytest.raises(InputError, match=r"in.jsonl:2: invalid Unicode: key 'text' has a lone surrogate"):
        preprocess(_opts(path, tmp_path / "o", tokenizer_path))
    s = preprocess(_opts(path, tmp_path / "o", tokenizer_path, on_error="skip"))
    assert s.documents == 2 and dict(s.skipped) == {"invalid Unicode": 1}


def test_full_disk_is_an_error_with_nothing_left(tmp_path, tokenizer_path):
    import resource

    big = write_jsonl(tmp_path / "big.jsonl", [{"text": "word " * 200}] * 3000)

    def limit_file_size():  # the kernel refuses writes past 64 KiB, as a full disk does
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))

    r = _run_tool("--input", big, "--output-prefix", str(tmp_path / "out" / "o"), "--tokenizer-model",
                  tokenizer_path, preexec_fn=limit_file_size)
    assert r.returncode == 2, r.stderr
    assert "error: --output-prefix: cannot write" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert os.listdir(tmp_path / "out") == []  # no dataset and no .tmp-PID files


def test_abort_on_a_full_disk_still_removes_the_temporaries(tmp_path):
    import numpy as np

    from megatron_bluelm.data.indexed_writer import IndexedWriter

    w = IndexedWriter(str(tmp_path / "o"), np.uint16)
    w._bin.close()
    w._bin = open("/dev/full", "wb", buffering=1 << 20)  # buffered bytes that can never be flushed
    w._bin.write(b"x" * 1000)
    w.abort()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("lines", [[], ["", "{bad", {"body": 1}]], ids=["empty-file", "every-line-skipped"])
def test_zero_documents_is_an_error(tmp_path, tokenizer_path, lines):
    path = write_jsonl(tmp_path / "in.jsonl", lines) if lines else str(tmp_path / "in.jsonl")
    if not lines:
        open(path, "wb").close()
    r = _run_tool("--input", path, "--output-prefix", str(tmp_path / "o"), "--tokenizer-model", tokenizer_path,
                  "--on-error", "skip")
    assert r.returncode == 2 and "error: --input: no documents in" in r.stderr, r.stderr
    assert ("the input is empty" if not lines else "all 3 lines were skipped") in r.stderr
    assert not list(tmp_path.glob("o_*"))


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path, tokenizer_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [tmp_path / f"o_text_document.bin.tmp-{dead.pid}", tmp_path / f"o_text_document.idx.tmp-{dead.pid}"]
    live = tmp_path / f"o_text_document.bin.tmp-{os.getppid()}"  # a process that still runs: left alone
    for p in (*stale, live):
        p.write_bytes(b"partial")
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    preprocess(_opts(path, tmp_path / "o", tokenizer_path))
    assert sorted(os.listdir(tmp_path)) == sorted(["in.jsonl", "o_text_document.bin", "o_text_document.idx",
                                                   live.name])


def test_sigterm_removes_the_temporaries(tmp_path, tokenizer_path):
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": "word " * 200}] * 30000)
    cmd = [sys.executable, TOOL, "--input", big, "--output-prefix", str(tmp_path / "out" / "o"),
           "--tokenizer-model", tokenizer_path, "--no-progress", "--chunk-bytes", "65536"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "out").is_dir() or not any(".tmp-" in n for n in os.listdir(tmp_path / "out")):
        assert time.time() < deadline and p.poll() is None, "writer never started"
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted: no output written" in err, err
    assert os.listdir(tmp_path / "out") == []


def test_directory_input_and_bad_threads_name_the_flag(tmp_path, tokenizer_path):
    (tmp_path / "shards").mkdir()
    with pytest.raises(ConfigError, match=r"--input: '.*shards' is a directory; give the JSONL files in it"):
        preprocess(_opts(str(tmp_path / "shards"), tmp_path / "o", tokenizer_path))
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    with pytest.raises(ConfigError, match=r"--threads: must be >= 0 .*got -3"):
        preprocess(_opts(path, tmp_path / "o", tokenizer_path, threads=-3))
