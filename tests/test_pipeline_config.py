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
