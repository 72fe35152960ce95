"""tools/benchmark.py --summarize: one table from the JSON files benchmark runs wrote."""
import json

from tools import benchmark


def test_summary_lists_every_row_and_the_stacks_that_failed(tmp_path, capsys):
    row = {"name": "trellis", "tokens_per_s_per_gpu": 60930.4, "mfu": 0.554, "peak_mem_gib": 35.9}
    (tmp_path / "b_base.json").write_text(json.dumps({"device": "GPU X", "rows": [row, dict(row, name="hf", mfu=None)]}))
    (tmp_path / "a_dpo.json").write_text(json.dumps({"device": "GPU X", "rows": [{"name": "trl", "error": "no trl"}]}))
    (tmp_path / "notes.txt").write_text("not a report")
    benchmark.main(["--summarize", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:] == ["| a_dpo | trl | error: no trl | | | |",
                         "| b_base | trellis | 60930 | 55.4% | 35.9 | GPU X |",
                         "| b_base | hf | 60930 | - | 35.9 | GPU X |"]
