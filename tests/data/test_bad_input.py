"""Bad input: a clear file:line message under --on-error fail; counted, never lost, under skip."""
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
