"""Dynamic loss scaling rules, and the optim config checks."""
import pytest

from engine.config import ConfigError, validate
from engine.loss_scaler import DynamicLossScaler
from tests.training_harness import tiny_config


def test_overflow_backs_off_after_hysteresis_and_clean_steps_grow():
    scaler = DynamicLossScaler(initial_scale=1024.0, growth_interval=3, hysteresis=2)
    scaler.update(found_inf=True)
    assert scaler.scale == 1024.0 and scaler.skipped_steps == 1  # first overflow absorbed by hysteresis
    scaler.update(found_inf=True)
    assert scaler.scale == 512.0
    for _ in range(2):
        scaler.update(found_inf=False)
    assert scaler.scale == 512.0
    scaler.update(found_inf=False)
    assert scaler.scale == 1024.0 and scaler.hysteresis_left == 2


def test_scale_never_drops_below_min_and_state_round_trips():
    scaler = DynamicLossScaler(initial_scale=4.0, min_scale=2.0, hysteresis=1)
    for _ in range(3):
        scaler.update(found_inf=True)
    assert scaler.scale == 2.0
    restored = DynamicLossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()


@pytest.mark.parametrize("overrides, key", [
    ({"optim": {"name": "adam"}}, "optim.name"),
    ({"optim": {"name": "adafactor", "shard": True}}, "optim.shard"),
    ({"optim": {"bucket_mb": 0}}, "optim.bucket_mb"),
    ({"optim": {"overlap_param_gather": True}}, "optim.overlap_param_gather"),
    ({"optim": {"hysteresis": 0}}, "optim.hysteresis"),
    ({"train": {"precision": "int4"}}, "train.precision"),
])
def test_bad_optim_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        validate(tiny_config(overrides), 1)
