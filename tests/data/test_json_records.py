"""Small JSONL inputs (RL tasks, preference pairs, metrics) read through one helper: bad lines named by
file:line, a missing file named by the setting that pointed at it."""
import pytest

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.data.jsonl import read_json_records


def _write(tmp_path, text):
    p = tmp_path / "f.jsonl"
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_records_with_line_numbers_blank_lines_skipped(tmp_path):
    path = _write(tmp_path, '{"a": 1}\n\n[2]\n')
    assert list(read_json_records(path, "nope")) == [(1, {"a": 1}), (3, [2])]


def test_invalid_json_and_missing_file_are_named(tmp_path):
    path = _write(tmp_path, '{"a": 1}\n{"a": \n')
    with pytest.raises(ConfigError, match=r"f\.jsonl:2: invalid JSON"):
        list(read_json_records(path, "nope"))
    with pytest.raises(ConfigError, match="rl.task: no such file"):
        list(read_json_records(str(tmp_path / "missing.jsonl"), "rl.task: no such file 'missing.jsonl'"))


def test_rl_task_and_preference_pairs_name_their_bad_lines(tmp_path):
    from megatron_bluelm.rl.tasks import JsonlTask
    from megatron_bluelm.stages.reward_model import load_pairs

    task = _write(tmp_path, '{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2"}\n')
    with pytest.raises(ConfigError, match=r"f\.jsonl:2: a record needs 'answer'"):
        JsonlTask(task)
    with pytest.raises(ConfigError, match="rl.task: no such file"):
        JsonlTask(str(tmp_path / "none.jsonl"))
    pairs = _write(tmp_path, '{"prompt": "q", "chosen": "a", "rejected": "b"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"f\.jsonl:2: invalid JSON"):
        load_pairs(pairs, seed=0)
