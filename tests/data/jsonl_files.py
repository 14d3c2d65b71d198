"""Small file helpers of the data tests (a module of its own: test modules cannot import a
conftest by name reliably when several test folders have one)."""
import gzip
import json


def read_docs(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def write_jsonl(path, lines):
    """Write raw lines (str or bytes) as a JSONL file; dicts are json-encoded."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write(line if isinstance(line, bytes) else line.encode("utf-8"))
            f.write(b"\n")
    return str(path)
