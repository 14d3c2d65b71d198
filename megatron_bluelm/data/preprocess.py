"""JSONL -> megatron-core indexed dataset, batched and parallel at the tokenizer.

Why it is fast: the main process only reads raw lines and writes tokens; lines travel to the
tokenizer in ~1 MB chunks, and each chunk is encoded with ONE batched SentencePiece call
(which runs in C++ without the GIL). `workers` processes encode chunks concurrently; with
workers=1 the batch is split over `threads` SentencePiece threads instead. Megatron-LM's
preprocess_data.py instead sends single documents through Pool.imap (pickling and a Python
round trip per document), which the benchmark in tools/bench/preprocess_bench.py compares.

Memory is bounded: at most `2 * workers + 1` chunks are in flight, whatever the input size.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.data.indexed_writer import IndexedWriter, committed, token_dtype
from megatron_bluelm.data.jsonl import (
    MAX_LINE_BYTES,
    BadLine,
    InputError,
    iter_lines,
    open_input,
    parse_line,
)

CHUNK_BYTES = 1 << 20
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


@dataclass
class Options:
    inputs: list[str]
    output_prefix: str
    tokenizer_model: str
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    split_sentences: bool = False
    workers: int = 1
    threads: int = 0  # SentencePiece threads per encoder; 0 = cores / workers
    on_error: str = "fail"  # or "skip"
    chunk_bytes: int = CHUNK_BYTES
    max_line_bytes: int = MAX_LINE_BYTES
    progress: bool = True


@dataclass
class Summary:
    lines: int = 0
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # first few skipped lines, file:line: why
    outputs: list[str] = field(default_factory=list)

    def format(self) -> str:
        rate = self.documents / max(self.seconds, 1e-9)
        mbs = self.bytes / 1e6 / max(self.seconds, 1e-9)
        out = [
            f"documents: {self.documents:,}   tokens: {self.tokens:,}   sequences: {self.sequences:,}",
            (f"lines read: {self.lines:,}   input: {self.bytes / 1e6:.1f} MB   time: {self.seconds:.1f} s"
             f"   ({rate:,.0f} docs/s, {mbs:.1f} MB/s)"),
            f"skipped lines: {sum(self.skipped.values()):,}",
        ]
        out += [f"  {n:,} x {kind}" for kind, n in self.skipped.most_common()]
        out += [f"  e.g. {e}" for e in self.examples]
        out += [f"wrote {p}.bin/.idx" for p in self.outputs]
        return "\n".join(out)


def split_sentences(text: str) -> list[str]:
    """A dependency-free splitter (end punctuation + space + capital); good enough for English."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


# ---- worker side: a chunk of raw lines -> token arrays per json key -------------------------

_W: dict = {}


def _init_encoder(model_path: str, keys: list[str], append_eod: bool, split: bool, threads: int):
    from megatron_bluelm.data.tokenizer import HFTokenizer, is_hf_tokenizer

    if is_hf_tokenizer(model_path):  # a Hugging Face tokenizer.json, our special tokens added
        tok = HFTokenizer(model_path)
        encode = lambda texts: [np.asarray(ids, dtype=np.int32) for ids in tok.encode_batch(texts)]  # noqa: E731
        eod, vocab = tok.eod, tok.vocab_size
    else:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=model_path)
        encode = lambda texts: sp.EncodeAsNumpy(texts, num_threads=threads)  # noqa: E731
        eod, vocab = sp.eos_id(), sp.GetPieceSize()
    _W.update(encode=encode, keys=keys, eod=eod, append_eod=append_eod, split=split, dtype=token_dtype(vocab))


def _encode_key(texts: list[str]):
    """Encode one key's texts; returns (tokens, per-sequence lengths, sequences per doc)."""
    if _W["split"]:
        pieces = [split_sentences(t) or [t] for t in texts]
        flat = [s for p in pieces for s in p]
        counts = np.array([len(p) for p in pieces], dtype=np.int64)
    else:
        flat, counts = texts, np.ones(len(texts), dtype=np.int64)
    seqs = _W["encode"](flat)
    lengths = np.fromiter(map(len, seqs), dtype=np.int32, count=len(seqs))
    if _W["append_eod"]:
        # EOD goes after each document's last sequence.
        last = np.cumsum(counts) - 1
        eod = np.array([_W["eod"]], dtype=np.int32)
        for i in last:
            seqs[i] = np.concatenate([seqs[i], eod])
        lengths[last] += 1
    tokens = np.concatenate(seqs).astype(_W["dtype"]) if seqs else np.zeros(0, _W["dtype"])
    return tokens, lengths, counts


def encode_chunk(chunk: list[tuple[int, bytes | BadLine]]):
    """Parse and encode one chunk of lines; bad lines come back as BadLine, in order."""
    keys, bad, per_key, nbytes = _W["keys"], [], [[] for _ in _W["keys"]], 0
    for lineno, raw in chunk:
        if isinstance(raw, BadLine):
            bad.append(raw)
            continue
        nbytes += len(raw)
        texts = parse_line(raw, keys, lineno)
        if isinstance(texts, BadLine):
            bad.append(texts)
            continue
        for k, t in enumerate(texts):
            per_key[k].append(t)
    encoded = [_encode_key(texts) for texts in per_key]
    return encoded, bad, len(chunk), nbytes


# ---- main side -----------------------------------------------------------------------------


def _chunks(opts: Options):
    """(path, [(line number, raw line | BadLine), ...]) chunks of about chunk_bytes each."""
    for path in opts.inputs:
        with open_input(path) as f:
            chunk, size = [], 0
            for lineno, raw in iter_lines(f, opts.max_line_bytes):
                chunk.append((lineno, raw))
                size += len(raw) if isinstance(raw, bytes) else 0
                if size >= opts.chunk_bytes:
                    yield path, chunk
                    chunk, size = [], 0
            if chunk:
                yield path, chunk


def _results(opts: Options, threads: int):
    """(path, encoded chunk) in input order: in-process, or from a bounded worker pool."""
    init = (opts.tokenizer_model, opts.json_keys, opts.append_eod, opts.split_sentences, threads)
    if opts.workers <= 1:
        _init_encoder(*init)
        for path, chunk in _chunks(opts):
            yield path, encode_chunk(chunk)
        return
    # Not "fork": forking a process that already runs threads (torch, a checkpoint writer, another
    # pool's helpers) can hand a worker a lock held forever (seen in the full test suite). The fork
    # server is a fresh single-threaded process; workers fork from it cheaply.
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(opts.workers, initializer=_init_encoder, initargs=init) as pool:
        pending: deque = deque()
        for path, chunk in _chunks(opts):
            pending.append((path, pool.apply_async(encode_chunk, (chunk,))))
            if len(pending) > 2 * opts.workers:
                path, res = pending.popleft()
                yield path, res.get()
        while pending:
            path, res = pending.popleft()
            yield path, res.get()


def output_prefixes(opts: Options) -> list[str]:
    level = "sentence" if opts.split_sentences else "document"
    return [f"{opts.output_prefix}_{key}_{level}" for key in opts.json_keys]


def check_options(opts: Options) -> None:
    """Fail before any work on the usual setup mistakes, naming the flag at fault."""
    if not opts.inputs:
        raise ConfigError("--input: no input files given")
    for path in opts.inputs:
        if os.path.isdir(path):
            raise ConfigError(f"--input: '{path}' is a directory; give the JSONL files in it (e.g. {path}/*.jsonl)")
        if not os.path.isfile(path):
            raise ConfigError(f"--input: no such file '{path}'")
    if not os.path.isfile(opts.tokenizer_model) and not os.path.isdir(opts.tokenizer_model):
        raise ConfigError(f"--tokenizer-model: no such file '{opts.tokenizer_model}'")
    if opts.on_error not in ("fail", "skip"):
        raise ConfigError(f"--on-error: must be 'fail' or 'skip', got '{opts.on_error}'")
    if opts.workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {opts.workers}")
    if opts.threads < 0:
        raise ConfigError(f"--threads: must be >= 0 (0: cores / workers), got {opts.threads}")
    if opts.chunk_bytes < 1 or opts.max_line_bytes < 1:
        raise ConfigError(f"--chunk-bytes / --max-line-bytes: must be >= 1, got {opts.chunk_bytes} / "
                          f"{opts.max_line_bytes}")
    out_dir = os.path.dirname(os.path.abspath(opts.output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--output-prefix: cannot create directory '{out_dir}': {e.strerror}") from e
    if not os.access(out_dir, os.W_OK):
        raise ConfigError(f"--output-prefix: directory '{out_dir}' is not writable")


def preprocess(opts: Options) -> Summary:
    check_options(opts)
    vocab = _vocab_size(opts.tokenizer_model)
    threads = opts.threads or max(1, (os.cpu_count() or 1) // opts.workers)
    summary, t0 = Summary(outputs=output_prefixes(opts)), time.time()
    writers = [IndexedWriter(p, token_dtype(vocab)) for p in summary.outputs]
    bar = _progress_bar(opts)
    try:
        with committed(*writers):
            for path, (encoded, bad, nlines, nbytes) in _results(opts, threads):
                _record_bad(path, bad, opts, summary)
                for writer, (tokens, lengths, counts) in zip(writers, encoded):
                    writer.add(tokens, lengths, counts)
                summary.lines += nlines
                summary.bytes += nbytes
                summary.documents += len(encoded[0][2])
                summary.sequences += len(encoded[0][1])
                if bar is not None:
                    bar.update(len(encoded[0][2]))
                    bar.set_postfix_str(f"{summary.bytes / 1e6 / (time.time() - t0):.1f} MB/s", refresh=False)
            check_not_empty(summary, opts)
    finally:
        if bar is not None:
            bar.close()
    summary.tokens = writers[0].num_tokens
    summary.seconds = time.time() - t0
    return summary


def check_not_empty(summary: Summary, opts: Options) -> None:
    """Zero documents make a dataset megatron-core cannot load: an error, and nothing is written."""
    if summary.documents:
        return
    why = (f"all {summary.lines:,} lines were skipped ({', '.join(k for k, _ in summary.skipped.most_common(3))}); "
           f"e.g. {summary.examples[0]}" if summary.lines else "the input is empty")
    raise ConfigError(f"--input: no documents in {', '.join(opts.inputs)}: {why}")


def _vocab_size(model_path: str) -> int:
    from megatron_bluelm.data.tokenizer import HFTokenizer, is_hf_tokenizer

    if is_hf_tokenizer(model_path):
        try:
            return HFTokenizer(model_path).vocab_size
        except ConfigError as e:
            raise ConfigError(f"--tokenizer-model: {e}") from None
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=model_path).GetPieceSize()
    except Exception as e:
        raise ConfigError(f"--tokenizer-model: cannot load '{model_path}': {e}") from e


def _record_bad(path: str, bad: list[BadLine], opts: Options, summary: Summary) -> None:
    for b in bad:
        if opts.on_error == "fail":
            raise InputError(path, b.lineno, b.message() + " (--on-error skip skips such lines)")
        summary.skipped[b.kind] += 1
        if len(summary.examples) < 10:
            summary.examples.append(f"{path}:{b.lineno}: {b.message()}")


def _progress_bar(opts: Options):
    if not opts.progress:
        return None
    from tqdm import tqdm

    return tqdm(unit=" docs", unit_scale=True, desc="tokenizing", mininterval=0.5)
