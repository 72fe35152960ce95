"""tools/multi_gpu_runs.py: which runs a machine of N GPUs gets, --only, and the scaling table."""
import json
import os

import pytest

from tools import multi_gpu_runs as runs


def names(jobs):
    return [job.name for job in jobs]


def test_parity_layouts_fit_the_gpus():
    reference, layouts = runs.parity_jobs(2, "/tmp/out", [])
    assert names(reference) == ["ref", "fp32"] and [job.gpus for job in reference] == [1, 1]
    assert names(layouts) == ["tp2", "tp2_sp", "pp2", "pp2_vpp2", "dp2", "dp2_shard"]
    assert "--init" in reference[0].argv and "--init" not in reference[1].argv
    four = names(runs.parity_jobs(4, "/tmp/out", [])[1])
    assert four[-3:] == ["tp2_pp2", "tp2_dp2", "pp2_dp2_shard"] and "tp2_pp2_dp2_shard" not in four


def test_scaling_runs_weak_scale_data_parallel_batches():
    jobs = {job.name: job for job in runs.scaling_jobs(4, "/tmp/out", ["--train.lr", "1e-4"])}
    assert [name for name in jobs if name.startswith("dp")] == ["dp1", "dp2", "dp4", "dp2_no_overlap", "dp2_shard"]
    batch = jobs["dp4"].argv[jobs["dp4"].argv.index("--global-batch") + 1]
    assert batch == str(4 * runs.MICRO_PER_GPU * 4)  # micro-batch 4, 8 micro-batches per GPU
    assert jobs["pp4_m32"].gpus == 4 and "--pp" in jobs["pp4_m32"].argv
    assert jobs["tp4_sp"].argv[-2:] == ["--train.lr", "1e-4"]  # extra arguments go to every run


def test_only_selects_names_and_groups_and_rejects_unknown_ones():
    jobs = runs.scaling_jobs(2, "/tmp/out", [])
    assert names(runs.selected(jobs, "tp,dp1")) == ["dp1", "tp2", "tp2_sp"]
    assert runs.selected(jobs, "") == jobs
    with pytest.raises(SystemExit, match="names no run or group: tp4"):
        runs.selected(jobs, "tp4")


def test_bubble():
    assert runs.bubble(2, 4) == pytest.approx(1 / 5)
    assert runs.bubble(4, 8, vpp=2) == pytest.approx(3 / 19)


def test_scaling_table_relates_every_run_to_one_gpu(tmp_path):
    out = str(tmp_path)
    os.makedirs(f"{out}/scaling")
    for name, rate in (("dp1", 1000.0), ("pp2_m4", 700.0)):
        row = {"tokens_per_s_per_gpu": rate, "mfu": 0.5, "peak_mem_gib": 10.0, "optimizer_state_gib": 2.0}
        with open(f"{out}/scaling/{name}.json", "w") as handle:
            json.dump({"rows": [row]}, handle)
    jobs = runs.selected(runs.scaling_jobs(2, out, []), "dp1,pp2_m4,tp2")
    lines = runs.scaling_table(jobs, out).splitlines()
    assert lines[2] == "| dp1 | 1 | 1000 | 100.0% |  | 50.0% | 10.0 | 2.00 |"
    assert lines[3] == "| pp2_m4 | 2 | 700 | 70.0% | 20.0% | 50.0% | 10.0 | 2.00 |"
    assert lines[4] == "| tp2 | 2 | failed | | | | | |"


def test_sweep_runs_one_layout_per_shape_then_flips_the_best():
    layouts = runs.sweep_layouts(8, "llama3-8b", 4096, 32, 141.0)
    shapes = [(layout.tp, layout.pp) for layout in layouts]
    first = shapes[:len(set(shapes))]
    assert len(set(first)) == len(first) and all(tp in runs.SWEEP_TP and pp in runs.SWEEP_PP for tp, pp in first)
    best, flips = layouts[0], layouts[len(first):]
    assert flips and all((flip.tp, flip.pp, flip.micro_batch) == (best.tp, best.pp, best.micro_batch) for flip in flips)
    assert any(flip.recompute != best.recompute for flip in flips)
    job = runs.sweep_jobs(8, "/tmp/out", [], "llama3-8b", 4096, 32, 141.0)[0]
    assert job.gpus == 8 and job.argv[job.argv.index("--tp") + 1] == str(best.tp)


def test_reloads_continue_one_step_past_the_saved_run():
    assert runs.reload_jobs(4, "/tmp/out", []) == []  # the saving layout needs 8 GPUs
    jobs = runs.reload_jobs(8, "/tmp/out", ["--train.iters", "3"])
    assert [job.name for job in jobs] == list(runs.CHECKPOINT_RELOADS)
    assert all(runs.last_value(job.argv, "--train.iters") == "4" for job in jobs)
    assert all(runs.last_value(job.argv, "--checkpoint.load") == "/tmp/out/checkpoint" for job in jobs)
