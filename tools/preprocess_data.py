"""Tokenize text into a Megatron-compatible indexed dataset: <prefix>.bin + <prefix>.idx.

Inputs are JSONL files (one document per line, text under --json-key) or plain text files
(one document per file, per paragraph or per line, see --text-document). Documents are
tokenized in --workers processes and written in input order, so the output does not depend
on the number of workers. An end-of-document token is appended to every document unless
--no-append-eod. Output is written to temp files and renamed into place at the end: a failed
or interrupted run leaves no <prefix>.bin/.idx behind (nor replaces existing ones).

Example:
    python tools/preprocess_data.py --input 'corpus/*.jsonl' --output-prefix data/corpus \\
        --tokenizer-type sentencepiece --tokenizer-model tok.model --workers 2
"""
from __future__ import annotations

import argparse
import glob
import multiprocessing
import os
import sys
import time

import numpy as np

# Runnable as `python tools/preprocess_data.py` from a checkout that is not pip-installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.data.errors import DataError
from engine.data.indexed_dataset import IndexedDatasetWriter
from engine.data.jsonl import BadRecord, parse_json_object, text_field
from engine.data.tokenizer import TOKENIZER_KINDS, build_tokenizer

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
CHUNK_BYTES = 1 << 20  # documents are sent to workers in chunks of about this much text

_worker = {}  # per-process state: tokenizer and options, set by _init_worker


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True,
                   help="input file or glob; may be given several times")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    p.add_argument("--tokenizer-type", choices=sorted(TOKENIZER_KINDS), required=True)
    p.add_argument("--tokenizer-model", required=True, help="sentencepiece .model or HF tokenizer.json (or its folder)")
    p.add_argument("--json-key", default="text", help="field holding the text in JSONL records (default: text)")
    p.add_argument("--input-format", choices=["auto", "jsonl", "text"], default="auto",
                   help="auto: JSONL for .jsonl/.json/.ndjson files, plain text otherwise")
    p.add_argument("--text-document", choices=["file", "paragraph", "line"], default="file",
                   help="what one document is in plain text input (default: the whole file)")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the end-of-document token to every document (default: on)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count malformed JSONL lines instead of stopping at the first")
    p.add_argument("--log-interval", type=float, default=5.0, help="seconds between progress lines")
    return p.parse_args(argv)


def expand_inputs(patterns: list[str]) -> list[str]:
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"Input pattern {pattern!r} matches no files.")
        for path in matches:
            if not os.path.isfile(path):
                raise DataError(f"Input file {path} does not exist.")
            files.append(path)
    return files


def read_chunks(path: str, fmt: str, text_document: str):
    """Chunks of (path, line_number, raw) items; raw is a JSONL line or a text document."""
    is_jsonl = fmt == "jsonl" or (fmt == "auto" and path.endswith(JSONL_SUFFIXES))
    items = _jsonl_items(path) if is_jsonl else _text_items(path, text_document)
    chunk, size = [], 0
    for item in items:
        chunk.append(item)
        size += len(item[2])
        if size >= CHUNK_BYTES:
            yield is_jsonl, chunk
            chunk, size = [], 0
    if chunk:
        yield is_jsonl, chunk


def _jsonl_items(path):
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                yield path, line_number, line


def _text_items(path, text_document):
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if text_document == "file":
        pieces = [(1, text)]
    else:
        separator = "\n\n" if text_document == "paragraph" else "\n"
        pieces, line = [], 1
        for piece in text.split(separator):
            pieces.append((line, piece))
            line += piece.count("\n") + separator.count("\n")
    for line_number, piece in pieces:
        if piece.strip():
            yield path, line_number, piece


def _init_worker(kind, model, json_key, append_eod):
    tokenizer = build_tokenizer(kind, model)
    _worker.update(tokenizer=tokenizer, json_key=json_key, eod=[tokenizer.eod_id] if append_eod else [])


def tokenize_chunk(job):
    """[(ids or None, problem or None, path, line, text bytes)] for one chunk."""
    is_jsonl, chunk = job
    out = []
    for path, line_number, raw in chunk:
        try:
            text = text_field(parse_json_object(raw), _worker["json_key"]) if is_jsonl else raw
        except BadRecord as e:
            out.append((None, str(e), path, line_number, len(raw.encode())))
            continue
        ids = _worker["tokenizer"].encode(text) + _worker["eod"] if text else []
        out.append((np.asarray(ids, dtype=np.int32), None, path, line_number, len(raw.encode())))
    return out


class Progress:
    def __init__(self, interval: float):
        self.start = self.last = time.time()
        self.interval = interval
        self.bytes = self.tokens = self.documents = 0

    def update(self, nbytes: int, ntokens: int, force: bool = False) -> None:
        self.bytes += nbytes
        self.tokens += ntokens
        self.documents += 1 if ntokens else 0
        now = time.time()
        if force or now - self.last >= self.interval:
            self.last = now
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        return (f"{self.documents} docs | {self.bytes / 1e6:.1f} MB | {self.tokens} tokens | "
                f"{self.bytes / 1e6 / elapsed:.2f} MB/s | {self.tokens / elapsed:,.0f} tokens/s | {elapsed:.1f} s")


def jobs(files, fmt, text_document):
    for path in files:
        yield from read_chunks(path, fmt, text_document)


def preprocess(args) -> dict:
    files = expand_inputs(args.input)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    init = (args.tokenizer_type, args.tokenizer_model, args.json_key, args.append_eod)
    progress = Progress(args.log_interval)
    skipped = 0
    with IndexedDatasetWriter(args.output_prefix, vocab_size=tokenizer.vocab_size) as writer:
        if args.workers > 1:
            pool = multiprocessing.Pool(args.workers, _init_worker, init)
            results = pool.imap(tokenize_chunk, jobs(files, args.input_format, args.text_document))
        else:
            pool = None
            _init_worker(*init)
            results = map(tokenize_chunk, jobs(files, args.input_format, args.text_document))
        try:
            for chunk in results:
                for ids, problem, path, line_number, nbytes in chunk:
                    if problem is not None:
                        if not args.skip_bad_lines:
                            raise DataError(f"{path}:{line_number}: line {problem}.")
                        skipped += 1
                    elif len(ids):
                        writer.add_document(ids)
                    progress.update(nbytes, 0 if ids is None else len(ids))
        finally:
            if pool is not None:
                pool.terminate()
        if writer.num_documents == 0:
            raise DataError(f"The input ({', '.join(files)}) holds no documents" + (f" ({skipped} bad lines skipped)." if skipped else "."))
        writer.finalize()
    progress.update(0, 0, force=True)
    return {"documents": writer.num_documents, "tokens": writer.num_tokens, "bytes": progress.bytes,
            "skipped": skipped, "seconds": time.time() - progress.start}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        stats = preprocess(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_prefix}.bin/.idx: {stats['documents']} documents, {stats['tokens']} tokens"
          + (f", {stats['skipped']} bad lines skipped" if stats["skipped"] else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
