"""Writer for megatron-core's indexed dataset format (.bin tokens + .idx index), crash-safe.

Both files are written under temporary names and renamed into place only in `finalize()`, so an
interrupted run never leaves an .idx that loads as valid: the old .idx is removed first, then the
.bin and finally the .idx are renamed (a crash in between leaves no .idx at all). Temporaries of a
killed run (``.tmp-PID`` of a process that no longer exists) are deleted by the next writer of the prefix.
The .idx layout is exactly `megatron.core.datasets.indexed_dataset._IndexWriter`'s; we write it
with numpy (vectorised pointers) instead of its per-sequence Python loop.
"""
from __future__ import annotations

import glob
import os
import struct
from contextlib import contextmanager, suppress

import numpy as np

from megatron_bluelm.config.errors import ConfigError

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.uint16: 8}
_WRITE_BUF = 16 << 20


def token_dtype(vocab_size: int):
    """uint16 when every id fits (half the disk and page cache), else int32 — as megatron-core."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedWriter:
    def __init__(self, prefix: str, dtype):
        self.prefix, self.dtype = prefix, np.dtype(dtype).type
        self.bin_path, self.idx_path = prefix + ".bin", prefix + ".idx"
        suffix = f".tmp-{os.getpid()}"
        self._bin_tmp, self._idx_tmp = self.bin_path + suffix, self.idx_path + suffix
        try:
            os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
            remove_stale_temporaries(prefix)
            self._bin = open(self._bin_tmp, "wb", buffering=_WRITE_BUF)  # noqa: SIM115 (closed in finalize/abort)
        except OSError as e:
            raise ConfigError(f"--output-prefix: cannot write '{self._bin_tmp}': {e.strerror}") from e
        self._lengths: list[np.ndarray] = []   # tokens per sequence, int32
        self._doc_counts: list[np.ndarray] = []  # sequences per document
        self.num_tokens = 0

    def _write_failed(self, path: str, e: OSError) -> ConfigError:
        return ConfigError(f"--output-prefix: cannot write '{path}': {e.strerror or e} "
                           f"(nothing was written; free space or choose another --output-prefix)")

    def add(self, tokens: np.ndarray, seq_lengths: np.ndarray, doc_seq_counts: np.ndarray) -> None:
        """Append a batch: concatenated tokens, their per-sequence lengths, sequences per doc."""
        try:
            self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        except OSError as e:  # e.g. a full disk
            raise self._write_failed(self._bin_tmp, e) from None
        self._lengths.append(np.asarray(seq_lengths, dtype=np.int32))
        self._doc_counts.append(np.asarray(doc_seq_counts, dtype=np.int64))
        self.num_tokens += int(tokens.size)

    def finalize(self) -> None:
        try:
            self._write_index()
        except OSError as e:
            raise self._write_failed(e.filename or self._idx_tmp, e) from None

    def _write_index(self) -> None:
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        docs = np.concatenate(self._doc_counts) if self._doc_counts else np.zeros(0, np.int64)
        itemsize = np.dtype(self.dtype).itemsize
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
        doc_index = np.concatenate([[0], np.cumsum(docs)]).astype(np.int64)
        with open(self._idx_tmp, "wb") as f:
            f.write(_INDEX_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", _DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(doc_index)))
            f.writelines(arr.tobytes(order="C") for arr in (lengths, pointers, doc_index))
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(self.idx_path):
            os.unlink(self.idx_path)
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        # Unlink first: closing flushes the write buffer, which fails again on a full disk.
        for p in (self._bin_tmp, self._idx_tmp):
            with suppress(FileNotFoundError):
                os.unlink(p)
        with suppress(OSError):
            self._bin.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(prefix: str) -> list[str]:
    """Delete ``PREFIX.{bin,idx}.tmp-PID`` left by a run that was killed (kill -9, power loss): their
    process is gone. A temporary whose process still runs (a concurrent writer) is left alone."""
    removed = []
    for path in glob.glob(glob.escape(prefix) + ".*.tmp-*"):
        pid = path.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            with suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
    return removed


@contextmanager
def committed(*writers: IndexedWriter):
    """All-or-nothing output: every writer is finalized when the block ends normally; on any error
    (in the block or while finalizing) every writer is aborted, so no half-written dataset loads."""
    try:
        yield writers
        for w in writers:
            w.finalize()
    except BaseException:
        for w in writers:
            w.abort()
        raise
