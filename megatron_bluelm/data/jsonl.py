"""Streaming JSONL input: plain, gzip or zstd, one document per line, in bounded memory.

Lines are read as raw bytes by the main process (cheap) and decoded/parsed where they are
tokenized (in worker processes), so every problem is reported as `file:line: reason`.
"""
from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

from megatron_bluelm.config.errors import ConfigError

MAX_LINE_BYTES = 64 << 20  # a longer line is reported (not read into memory whole)
_READ_BUF = 8 << 20


class InputError(ConfigError):
    """A bad input line; the message starts with `file:line:`."""

    def __init__(self, path: str, lineno: int, reason: str):
        super().__init__(f"{path}:{lineno}: {reason}")
        self.path, self.lineno, self.reason = path, lineno, reason


@dataclass
class BadLine:
    """A line that could not become a document, kept so it is counted and reported."""

    lineno: int
    kind: str  # short category, counted in the summary
    detail: str = ""

    def message(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind


def open_input(path: str) -> io.BufferedIOBase:
    """Open a .jsonl / .jsonl.gz / .jsonl.zst file for binary reading (sniffs magic bytes)."""
    try:
        raw = open(path, "rb", buffering=_READ_BUF)  # noqa: SIM115 (returned to the caller)
    except OSError as e:
        raise ConfigError(f"--input: cannot open '{path}': {e.strerror}") from e
    magic = raw.peek(4)[:4]
    if magic[:2] == b"\x1f\x8b":
        return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), buffer_size=_READ_BUF)
    if magic == b"\x28\xb5\x2f\xfd":
        try:
            import zstandard
        except ImportError as e:
            raise ConfigError(f"--input: '{path}' is zstd-compressed; pip install zstandard") from e
        stream = zstandard.ZstdDecompressor().stream_reader(raw, read_size=_READ_BUF)
        return io.BufferedReader(stream, buffer_size=_READ_BUF)
    return raw


def iter_lines(f, max_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | BadLine]]:
    """Yield (line number, raw line) and a BadLine for lines over `max_bytes`.

    readline(limit) keeps memory bounded: an overlong line is drained in chunks, never held.
    """
    lineno = 0
    while True:
        line = f.readline(max_bytes + 1)
        if not line:
            return
        lineno += 1
        if len(line) > max_bytes and not line.endswith(b"\n"):
            total = len(line) + _drain_line(f)
            yield lineno, BadLine(lineno, "line too long", f"{total} bytes, limit {max_bytes}")
            continue
        yield lineno, line


def _drain_line(f) -> int:
    skipped = 0
    while True:
        chunk = f.readline(_READ_BUF)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


def parse_line(raw: bytes, keys: list[str], lineno: int = 0) -> list[str] | BadLine:
    """The texts under `keys` of one JSONL line, or a BadLine saying why it is unusable."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadLine(lineno, "not valid UTF-8", f"byte 0x{raw[e.start]:02x} at offset {e.start}")
    if not line.strip():
        return BadLine(lineno, "blank line")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return BadLine(lineno, "malformed JSON", f"{e.msg} (column {e.colno})")
    if not isinstance(obj, dict):
        return BadLine(lineno, "not a JSON object", type(obj).__name__)
    texts = []
    for key in keys:
        if key not in obj:
            return BadLine(lineno, f"missing key '{key}'", f"keys are {sorted(obj)[:8]}")
        text = obj[key]
        if not isinstance(text, str):
            return BadLine(lineno, f"key '{key}' is not a string", type(text).__name__)
        if not text.strip():
            return BadLine(lineno, "empty document", f"key '{key}'")
        texts.append(text)
    return texts
