"""tools/benchmark.py --summarize: one table from the JSON files benchmark runs wrote; the peak
memory of runs with CUDA graphs."""
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


def test_peak_memory_adds_the_free_part_of_cuda_graph_pools(monkeypatch):
    """A graph replay bypasses the allocator: the free bytes of private pools are added, the
    default pool's are not (its peak is max_memory_allocated's)."""
    segments = [{"segment_pool_id": (0, 0), "total_size": 1000, "allocated_size": 100},
                {"segment_pool_id": (1, 0), "total_size": 800, "allocated_size": 300},
                {"segment_pool_id": (1, 0), "total_size": 200, "allocated_size": 200},
                {"segment_pool_id": (2, 1), "total_size": 64, "allocated_size": 0}]
    monkeypatch.setattr(benchmark.torch.cuda, "memory_snapshot", lambda: segments)
    assert benchmark.graph_pool_transient_bytes() == 500 + 64
