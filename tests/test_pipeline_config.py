"""Pipeline layout: the stage split and the one-sentence errors for layouts that cannot run."""
import pytest

from engine.config import ConfigError, parse_args, validate
from models.pipeline_split import chunk_layer_ids, stage_layer_counts


def test_even_split_and_interleaved_chunks():
    assert stage_layer_counts(8, pp=2) == [4, 4]
    # rank 1's chunks are model stages 1 and 3 of 4 with vpp=2
    assert chunk_layer_ids(8, pp=2, vpp=2, pp_rank=1, chunk=0) == [2, 3]
    assert chunk_layer_ids(8, pp=2, vpp=2, pp_rank=1, chunk=1) == [6, 7]


def test_explicit_split():
    assert [chunk_layer_ids(7, 3, 1, rank, 0, "3,2,2") for rank in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]


def test_auto_split_unloads_the_output_layers_rank():
    from models.pipeline_split import balanced_layer_counts

    assert balanced_layer_counts(24, 2, 1, 1.3) == [13, 11]  # loads 13 and 11 + 1.3
    assert balanced_layer_counts(24, 4, 1, 1.3) == [6, 6, 7, 5]  # extra layers away from the first ranks
    assert balanced_layer_counts(32, 4, 1, 0.4) == [8, 8, 8, 8]  # a small output layer changes nothing
    # interleaved: rank totals 13 and 11, each spread over its two chunks (model order c0r0 c0r1 c1r0 c1r1)
    assert balanced_layer_counts(24, 2, 2, 1.3) == [6, 5, 7, 6]
    assert balanced_layer_counts(4, 2, 2, 5.0) == [1, 1, 1, 1]  # every chunk keeps a layer
    assert balanced_layer_counts(24, 1, 1, 1.1) == [24]  # one stage holds every layer
    with pytest.raises(ValueError, match="at least one layer per model stage"):
        balanced_layer_counts(3, 2, 2, 1.0)


def test_auto_split_is_resolved_by_validation():
    cfg = validate(parse_args(["--data.mock", "true", "--model.preset", "llama-1.3b", "--parallel.pp", "2",
                               "--parallel.pipeline_layers", "auto"]), 2)
    assert cfg.parallel.pipeline_layers == "13,11"  # llama-1.3b's output layer is 1.3 layers of work


def pipeline_args(*extra):
    return ["--data.mock", "true", "--model.preset", "tiny", *extra]


@pytest.mark.parametrize("argv, world, fragment", [
    (pipeline_args("--parallel.pp", "3"), 3, "model.num_layers: 4 layers do not split evenly over parallel.pp=3"),
    (pipeline_args("--parallel.pp", "2", "--parallel.vpp", "4"), 2,
     "do not split evenly over parallel.pp x parallel.vpp = 2 x 4"),
    (pipeline_args("--parallel.pp", "3", "--model.num_layers", "7", "--parallel.pipeline_layers", "3,3,3"), 3,
     "sum to 9, not model.num_layers=7"),
    (pipeline_args("--parallel.pp", "3", "--model.num_layers", "7", "--parallel.pipeline_layers", "5,2"), 3,
     "needs one count per model stage"),
    (pipeline_args("--parallel.pp", "2", "--parallel.pipeline_layers", "4,0"), 2, "at least one layer"),
    (pipeline_args("--parallel.vpp", "2"), 1, "parallel.vpp: virtual stages (2) need parallel.pp > 1"),
    (pipeline_args("--parallel.pp", "2", "--parallel.vpp", "2", "--train.micro_batch_size", "2",
                   "--train.global_batch_size", "6"), 2, "needs the number of microbatches per step"),
])
def test_bad_pipeline_layouts_name_the_key(argv, world, fragment):
    with pytest.raises(ConfigError) as info:
        validate(parse_args(argv), world_size=world)
    assert fragment in str(info.value)


def test_good_pipeline_layouts_validate():
    validate(parse_args(pipeline_args("--parallel.pp", "2", "--parallel.vpp", "2", "--train.micro_batch_size", "4",
                                      "--train.global_batch_size", "16")), world_size=4)
    validate(parse_args(pipeline_args("--parallel.pp", "3", "--model.num_layers", "7",
                                      "--parallel.pipeline_layers", "3,2,2")), world_size=3)
