import os
import subprocess
import sys

import numpy as np
import pytest

from engine.data.indexed_dataset import IndexedDataset
from tests.data.conftest import STDLIB, write_jsonl
from tools.preprocess_data import main

TEXTS = [f"document {i}: " + "def f(x):\n    return x\n" * (i % 7 + 1) for i in range(300)]


def run(inputs, prefix, model, *extra, kind="sentencepiece"):
    argv = [a for path in inputs for a in ("--input", str(path))]
    argv += ["--output-prefix", str(prefix), "--tokenizer-type", kind, "--tokenizer-model", model, *extra]
    return main(argv)


def read_all(prefix):
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def test_jsonl_documents_get_eod_and_workers_do_not_change_output(tmp_path, sp_model_path, sp_tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl", [{"body": t} for t in TEXTS])
    assert run([path], tmp_path / "one", sp_model_path, "--json-key", "body") == 0
    assert run([path], tmp_path / "two", sp_model_path, "--json-key", "body", "--workers", "2") == 0
    assert read_all(tmp_path / "one") == [sp_tokenizer.encode(t) + [sp_tokenizer.eod_id] for t in TEXTS]
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()
    assert IndexedDataset(str(tmp_path / "one")).dtype == np.uint16


def test_text_files_glob_and_no_eod(tmp_path, hf_tokenizer_dir, hf_tokenizer):
    for i in range(3):
        (tmp_path / f"f{i}.txt").write_text(f"first line {i}\nsecond line\n")
    assert run([tmp_path / "f*.txt"], tmp_path / "files", hf_tokenizer_dir, "--no-append-eod", kind="hf") == 0
    assert read_all(tmp_path / "files") == [hf_tokenizer.encode(f"first line {i}\nsecond line\n") for i in range(3)]
    assert run([tmp_path / "f0.txt"], tmp_path / "lines", hf_tokenizer_dir, "--text-document", "line", kind="hf") == 0
    eod = hf_tokenizer.eod_id
    assert read_all(tmp_path / "lines") == [hf_tokenizer.encode("first line 0") + [eod], hf_tokenizer.encode("second line") + [eod]]


@pytest.mark.parametrize("line, problem", [("{not json", "is not valid JSON"), ('{"other": "x"}', "has no 'text' field"),
                                           ('{"text": 3}', "has a 'text' field that is not a string")])
def test_bad_line_stops_with_file_and_line_and_leaves_nothing(tmp_path, sp_model_path, capsys, line, problem):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, {"text": "b"}, line, {"text": "c"}])
    assert run([path], tmp_path / "out", sp_model_path, "--workers", "2") == 1
    assert f"in.jsonl:3: line {problem}" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]
    assert run([path], tmp_path / "out", sp_model_path, "--skip-bad-lines") == 0
    assert len(read_all(tmp_path / "out")) == 3
    assert "1 bad lines skipped" in capsys.readouterr().err


def test_failure_keeps_the_previous_output(tmp_path, sp_model_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "a"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{"])
    assert run([good], tmp_path / "out", sp_model_path) == 0
    before = (tmp_path / "out.bin").read_bytes(), (tmp_path / "out.idx").read_bytes()
    assert run([bad], tmp_path / "out", sp_model_path) == 1
    assert ((tmp_path / "out.bin").read_bytes(), (tmp_path / "out.idx").read_bytes()) == before


def test_empty_and_missing_inputs(tmp_path, sp_model_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert run([tmp_path / "empty.jsonl"], tmp_path / "out", sp_model_path) == 1
    assert "holds no documents." in capsys.readouterr().err
    assert run([tmp_path / "nothing*.jsonl"], tmp_path / "out", sp_model_path) == 1
    assert "matches no files" in capsys.readouterr().err
    assert not any(name.startswith("out") for name in os.listdir(tmp_path))


def test_help_documents_the_options():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, os.path.join(root, "tools", "preprocess_data.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for option in ("--json-key", "--workers", "--append-eod", "--skip-bad-lines", "--tokenizer-type"):
        assert option in out


def test_real_stdlib_source_round_trips(tmp_path, sp_model_path, sp_tokenizer):
    source = os.path.join(STDLIB, "json", "decoder.py")
    assert run([source], tmp_path / "src", sp_model_path) == 0
    (ids,) = read_all(tmp_path / "src")
    assert ids[-1] == sp_tokenizer.eod_id
    with open(source) as f:
        assert sp_tokenizer.decode(ids[:-1]) == f.read()
