import pytest

from engine.config import ConfigError, Config, parse_args, validate, describe_keys
from engine.lr_schedule import lr_at


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: tiny\ntrain:\n  lr: 0.1\n  iters: 5\ndata:\n  mock: true\n")
    cfg = parse_args(["--config", str(path), "--train.lr", "3e-4", "parallel.tp=2", "--parallel.sp"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.iters == 5
    assert cfg.parallel.tp == 2 and cfg.parallel.sp is True
    validate(cfg, world_size=4)
    assert cfg.model.hidden_size == 64 and cfg.train.global_batch_size == cfg.train.micro_batch_size * 2


def test_explicit_model_values_override_the_preset():
    cfg = validate(parse_args(["--data.mock", "true", "--model.preset", "tiny", "--model.num_layers", "2"]), 1)
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == 64


@pytest.mark.parametrize("argv, fragment", [
    (["--train.lrr", "1"], "unknown key 'train.lrr'; did you mean train.lr?"),
    (["--trian.lr", "1"], "did you mean train"),
    (["--train.iters", "ten"], "train.iters: expected a whole number"),
    (["--parallel.sp", "maybe"], "parallel.sp: expected true or false"),
    (["--data.mock", "true", "--train.lr_schedule", "exp"], "train.lr_schedule: must be one of"),
    (["--data.mock", "true", "--model.preset", "nope"], "model.preset must be one of"),
    (["--data.mock", "true", "--train.global_batch_size", "7"], "train.global_batch_size: 7 is not a multiple"),
    (["--train.iters", "3"], "data.path: give dataset prefixes"),
])
def test_bad_values_name_the_key(argv, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        validate(parse_args(argv), world_size=1)
    assert fragment in str(info.value)


def test_layout_errors():
    with pytest.raises(ConfigError, match="parallel.tp: 8 does not divide model.num_heads=4"):
        validate(parse_args(["--data.mock", "true", "--parallel.tp", "8"]), world_size=8)
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        validate(parse_args(["--data.mock", "true", "--parallel.tp", "2"]), world_size=3)


@pytest.mark.parametrize("extra, fragment", [
    (["--train.fp8_format", "e5m2"], "train.fp8_format: must be hybrid or e4m3"),
    (["--train.fp8_scaling", "block"], "train.fp8_scaling: must be tensor or row"),
    (["--train.fp8_backend", "transformer_engine"], "train.fp8_backend: must be one of auto, te, trellis"),
    (["--train.fp8_amax_history", "0"], "train.fp8_amax_history: must be at least 1"),
    (["--train.fp8_scaling", "row", "--train.fp8_amax_history", "4"], "applies to tensor scaling only"),
])
def test_fp8_recipe_errors(extra, fragment):
    with pytest.raises(ConfigError) as info:
        validate(parse_args(["--data.mock", "true", "--train.precision", "fp8", *extra]), world_size=1)
    assert fragment in str(info.value)


@pytest.mark.parametrize("extra, world, fragment", [
    (["--train.device", "cpu"], 1, "model.cuda_graphs: CUDA graphs need a CUDA device (train.device is cpu)"),
    (["--parallel.pp", "2", "--train.device", "cuda"], 2, "model.cuda_graphs: needs parallel.pp 1 (got 2)"),
    (["--model.recompute", "full", "--train.device", "cuda"], 1, "model.cuda_graphs: cannot replay activation recompute"),
    (["--model.dropout", "0.1", "--train.device", "cuda"], 1, "model.cuda_graphs: needs model.dropout and model.attention_dropout 0"),
    (["--finetune.lora_dropout", "0.1", "--train.device", "cuda"], 1, "model.cuda_graphs: needs finetune.lora_dropout 0"),
    (["--train.precision", "fp8", "--train.fp8_amax_history", "4", "--train.device", "cuda"], 1,
     "model.cuda_graphs: cannot keep train.fp8_amax_history 4 exact"),
    (["--train.objective", "grpo", "--train.device", "cuda"], 1,
     "train.objective grpo packs documents into its sequences, which the graphs replay only with "
     "model.attention_backend sdpa (got auto)"),
])
def test_cuda_graph_limits_are_config_errors(extra, world, fragment):
    argv = ["--data.mock", "true", "--model.cuda_graphs", "true", *extra]
    with pytest.raises(ConfigError) as info:
        validate(parse_args(argv), world_size=world)
    assert fragment in str(info.value)
    validate(parse_args(["--data.mock", "true", "--model.cuda_graphs", "true", "--train.device", "cuda"]), world_size=1)


@pytest.mark.parametrize("objective", ["sft", "ppo", "grpo"])
def test_cuda_graphs_take_packed_documents_through_sdpa(objective):
    from engine.config import validate_cuda_graphs

    validate_cuda_graphs(parse_args(["--model.cuda_graphs", "true", "--train.device", "cuda",
                                     "--train.objective", objective, "--model.attention_backend", "sdpa"]))
    with pytest.raises(ConfigError, match="only with model.attention_backend sdpa .got flex."):
        validate_cuda_graphs(parse_args(["--model.cuda_graphs", "true", "--train.device", "cuda",
                                         "--train.objective", objective, "--model.attention_backend", "flex"]))


def test_unknown_yaml_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'"):
        parse_args(["--config", str(path)])


def test_help_lists_every_key():
    text = describe_keys()
    for key in ("train.iters", "train.micro_batch_size", "train.global_batch_size", "train.lr", "train.clip_grad",
                "train.seed", "train.output_dir", "data.mock", "model.preset", "parallel.tp", "parallel.pp", "parallel.sp"):
        assert key in text


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_lr_schedules_warm_up_then_decay_to_min(schedule):
    kwargs = dict(lr=1.0, min_lr=0.1, warmup=10, decay_iters=100, schedule=schedule, wsd_decay_fraction=0.2)
    assert lr_at(0, **kwargs) == pytest.approx(0.1)
    assert lr_at(9, **kwargs) == pytest.approx(1.0)
    assert lr_at(100, **kwargs) == pytest.approx(0.1)
    values = [lr_at(s, **kwargs) for s in range(10, 101)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))
    if schedule == "wsd":
        assert lr_at(79, **kwargs) == pytest.approx(1.0) and lr_at(90, **kwargs) == pytest.approx(0.55)
    if schedule == "cosine":
        assert lr_at(55, **kwargs) == pytest.approx(0.55)


def test_constant_schedule():
    assert lr_at(500, lr=2.0, min_lr=0.0, warmup=0, decay_iters=10, schedule="constant") == 2.0
