"""Streaming JSONL input: plain, gzip or zstd, one document per line, in bounded memory.

Lines are read as raw bytes by the main process (cheap) and decoded/parsed where they are
tokenized (in worker processes), so every problem is reported as `file:line: reason`.
"""
from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from megatron_bluelm.config.errors import ConfigError

MAX_LINE_BYTES = 64 << 20  # a longer line is reported (not read into memory whole)
_READ_BUF = 8 << 20
# Decompressed data is buffered in small steps so that a read error is reported near its line.
_DECODED_BUF = 1 << 16


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


class _Input(io.BufferedReader):
    """A buffered binary reader that knows which file it reads (for `file:line` messages)."""

    input_path: str = "<input>"
    compression: str = ""


class _ZstdFrames(io.RawIOBase):
    """zstd decompression that notices a truncated frame (the library's stream reader ends quietly,
    so a cut-off .zst would read as a shorter valid file). Concatenated frames are read in order."""

    _IN = 1 << 17

    def __init__(self, raw, zstandard):
        self.raw, self._zstd = raw, zstandard
        self._dobj, self._pending, self._in_frame = None, b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self._pending:
            data = self.raw.read(self._IN)
            if not data:
                if self._in_frame:
                    raise EOFError("zstd data ends in the middle of a frame (truncated file?)")
                return 0
            while data:
                if self._dobj is None:
                    self._dobj, self._in_frame = self._zstd.ZstdDecompressor().decompressobj(), True
                self._pending += self._dobj.decompress(data)
                data = b""
                if self._dobj.eof:
                    data, self._dobj, self._in_frame = self._dobj.unused_data, None, False
        n = min(len(buf), len(self._pending))
        buf[:n], self._pending = self._pending[:n], self._pending[n:]
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


_DECODE_ERRORS: tuple = (EOFError, OSError, zlib.error)


def open_input(path: str) -> io.BufferedIOBase:
    """Open a .jsonl / .jsonl.gz / .jsonl.zst file for binary reading (sniffs magic bytes)."""
    global _DECODE_ERRORS
    try:
        raw = _Input(io.FileIO(path, "rb"), buffer_size=_READ_BUF)
    except IsADirectoryError:
        raise ConfigError(f"--input: '{path}' is a directory; give the JSONL files in it (e.g. {path}/*.jsonl)") \
            from None
    except OSError as e:
        raise ConfigError(f"--input: cannot open '{path}': {e.strerror}") from e
    magic = raw.peek(4)[:4]
    if magic[:2] == b"\x1f\x8b":
        f, kind = _Input(gzip.GzipFile(fileobj=raw, mode="rb"), buffer_size=_DECODED_BUF), "gzip"
    elif magic == b"\x28\xb5\x2f\xfd":
        try:
            import zstandard
        except ImportError as e:
            raise ConfigError(f"--input: '{path}' is zstd-compressed; pip install zstandard") from e
        _DECODE_ERRORS = (EOFError, OSError, zlib.error, zstandard.ZstdError)
        f, kind = _Input(_ZstdFrames(raw, zstandard), buffer_size=_DECODED_BUF), "zstd"
    else:
        f, kind = raw, ""
    f.input_path, f.compression = path, kind
    return f


def iter_lines(f, max_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | BadLine]]:
    """Yield (line number, raw line) and a BadLine for lines over `max_bytes`.

    readline(limit) keeps memory bounded: an overlong line is drained in chunks, never held.
    """
    lineno = 0
    while True:
        line = _readline(f, max_bytes + 1, lineno)
        if not line:
            return
        lineno += 1
        if len(line) > max_bytes and not line.endswith(b"\n"):
            total = len(line) + _drain_line(f)
            yield lineno, BadLine(lineno, "line too long", f"{total} bytes, limit {max_bytes}")
            continue
        yield lineno, line


def _readline(f, limit: int, lineno: int) -> bytes:
    """f.readline(limit), with a decompression failure reported as `file:line` (the line being read)."""
    try:
        return f.readline(limit)
    except _DECODE_ERRORS as e:
        kind = getattr(f, "compression", "") or "input"
        raise InputError(getattr(f, "input_path", "<input>"), lineno + 1,
                         f"cannot read the {kind} data at or near this line: {e} (a truncated or corrupt file)") \
            from None


def _drain_line(f) -> int:
    skipped = 0
    while True:
        chunk = _readline(f, _READ_BUF, -1)
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
        if "\\u" in line and not _encodable(text):  # only JSON escapes can make a lone surrogate
            return BadLine(lineno, "invalid Unicode", f"key '{key}' has a lone surrogate escape (e.g. \\ud800)")
        if not text.strip():
            return BadLine(lineno, "empty document", f"key '{key}'")
        texts.append(text)
    return texts


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def read_json_records(path: str, missing: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line of a small UTF-8 JSONL file (tasks, preference
    pairs, metrics). A line that is not JSON is a ConfigError naming ``path:line``; a missing file is one
    saying ``missing``. Callers check the records' fields."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(missing) from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
