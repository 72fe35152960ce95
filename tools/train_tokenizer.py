"""Train a sentencepiece tokenizer (BPE or unigram) on local text files.

Writes <output-prefix>.model (atomically). Special tokens given with --special-tokens (for
example '<|im_start|>,<|im_end|>') become single pieces that text containing them encodes
to. Byte fallback is on by default so every input (code indentation, newlines, rare
characters) survives a round trip; whitespace is kept as written.

Example:
    python tools/train_tokenizer.py --input 'corpus/*.txt' --output-prefix tok --vocab-size 8000
"""
from __future__ import annotations

import argparse
import glob
import io
import os
import sys

# Pieces every model gets: pad/unk/bos/eos with fixed ids.
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True, help="text file or glob; may be repeated")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--special-tokens", default="", help="comma-separated user-defined tokens, e.g. '<|im_start|>,<|im_end|>'")
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-lines", type=int, default=1_000_000, help="sample at most this many input lines")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def input_files(patterns):
    files = [f for pattern in patterns for f in sorted(glob.glob(pattern))]
    if not files:
        raise SystemExit(f"error: no input files match {patterns}")
    return files


def train(args) -> str:
    import sentencepiece as spm

    specials = [t for t in args.special_tokens.split(",") if t]
    spm.set_random_generator_seed(args.seed)  # input sampling is random; make it repeatable
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=input_files(args.input),
        model_writer=model,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        user_defined_symbols=specials,
        byte_fallback=args.byte_fallback,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
        # Keep text as written: code and prose both need their spaces.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,  # else every separately encoded piece gains a leading space
        allow_whitespace_only_pieces=True,
        split_digits=True,
        input_sentence_size=args.max_lines,
        shuffle_input_sentence=True,
        num_threads=args.threads,
        minloglevel=2,
    )
    path = args.output_prefix + ".model"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    path = train(parse_args(argv))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
