"""Fixtures shared by the test modules."""
import pytest
import torch.distributed as dist


@pytest.fixture
def one_process_group():
    """A one-rank gloo group in this process (what a gradient buffer needs to be built)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
