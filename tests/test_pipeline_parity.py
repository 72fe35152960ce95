"""Parallel equals serial for pipeline parallelism: PP, interleaved PP, an uneven split and the
full TP x PP x DP grid, on real gloo processes, give the losses and weights of one process."""
import functools

import pytest

from tests.distributed import run_distributed
from tests.test_parity_tp_dp import assert_matches_serial
from tests.training_harness import train_and_collect


@functools.lru_cache(maxsize=None)
def serial_run(preset: str, num_layers: int = 0):
    model = {"preset": preset, **({"num_layers": num_layers} if num_layers else {})}
    return run_distributed(train_and_collect, 1, {"model": model})[0]


# name: (world size, preset, model overrides, parallel overrides); tiny unties, tiny-gpt2 ties embeddings
LAYOUTS = {
    "pp2_untied": (2, "tiny", {}, {"pp": 2}),
    "pp2_tied": (2, "tiny-gpt2", {}, {"pp": 2}),
    "pp4_tied": (4, "tiny-gpt2", {}, {"pp": 4}),
    "pp2_vpp2_untied": (2, "tiny", {}, {"pp": 2, "vpp": 2}),
    "pp2_vpp2_tied": (2, "tiny-gpt2", {}, {"pp": 2, "vpp": 2}),
    "pp3_uneven_7_layers": (3, "tiny", {"num_layers": 7}, {"pp": 3, "pipeline_layers": "3,2,2"}),
    "tp2_pp2_dp2_tied": (8, "tiny-gpt2", {}, {"tp": 2, "pp": 2}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_matches_serial(layout):
    world, preset, model, parallel = LAYOUTS[layout]
    results = run_distributed(train_and_collect, world, {"model": {"preset": preset, **model}, "parallel": parallel})
    serial = serial_run(preset, model.get("num_layers", 0))
    for result in results:  # every rank reports the same loss and holds the whole model's weights
        assert_matches_serial(result, serial)
