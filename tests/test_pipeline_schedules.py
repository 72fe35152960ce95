"""The schedules on their own, with a toy model of one matrix per model stage on real gloo
processes: gradients and losses equal the serial chain's, 1F1B's activation memory bound
(counted in the schedule), the interleaved warm-up depth, and the Chrome trace."""
import json
import os

import pytest
import torch

from tests.distributed import run_distributed

PP, WIDTH, ROWS = 4, 8, 3
CASES = [(2, 1), (4, 1), (8, 1), (4, 2), (8, 2)]  # (microbatches, virtual chunks per rank)


def stage_weight(stage: int) -> torch.Tensor:
    return torch.randn(WIDTH, WIDTH, generator=torch.Generator().manual_seed(stage)) * 0.5


def microbatch_input(index: int) -> torch.Tensor:
    return torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(1000 + index))


def stage_forward(x, weight, is_last: bool, num_microbatches: int):
    y = torch.tanh(x @ weight)
    return y.pow(2).mean() / num_microbatches if is_last else y


def serial_reference(num_microbatches: int, num_stages: int):
    weights = [stage_weight(s).requires_grad_() for s in range(num_stages)]
    losses = []
    for index in range(num_microbatches):
        x = microbatch_input(index)
        for stage, weight in enumerate(weights):
            x = stage_forward(x, weight, stage == num_stages - 1, num_microbatches)
        x.backward()
        losses.append(x.detach())
    return losses, [w.grad for w in weights]


def run_toy_pipeline(cases, trace_dir):
    import torch.distributed as dist

    from parallel.pipeline.p2p import PipelineCommunicator
    from parallel.pipeline.schedules import run_schedule
    from parallel.pipeline.trace import build_tracer

    dist.init_process_group("gloo")
    rank, pp = dist.get_rank(), dist.get_world_size()
    tracer = build_tracer(os.path.join(trace_dir, "trace.json"), rank, torch.device("cpu"))
    comm = PipelineCommunicator(dist.group.WORLD, rank, (ROWS, WIDTH), torch.float32, torch.device("cpu"), tracer)
    outcomes = []
    for num_microbatches, vpp in cases:
        weights = [stage_weight(chunk * pp + rank).requires_grad_() for chunk in range(vpp)]

        def forward_step(chunk, microbatch, input_tensor):
            stage = chunk * pp + rank
            x = microbatch_input(microbatch) if stage == 0 else input_tensor
            return stage_forward(x, weights[chunk], stage == pp * vpp - 1, num_microbatches)

        trained = run_schedule(forward_step, num_microbatches, vpp, comm, tracer=tracer)
        with torch.no_grad():
            evaluated = run_schedule(forward_step, num_microbatches, vpp, comm, forward_only_pass=True)
        outcomes.append({"stats": trained.stats, "losses": trained.losses, "eval_losses": evaluated.losses,
                         "grads": [w.grad for w in weights]})
    tracer.save()
    dist.barrier()
    dist.destroy_process_group()
    return outcomes


@pytest.fixture(scope="module")
def toy_results(tmp_path_factory):
    trace_dir = str(tmp_path_factory.mktemp("trace"))
    return run_distributed(run_toy_pipeline, PP, CASES, trace_dir), trace_dir


@pytest.mark.parametrize("case", range(len(CASES)))
def test_schedules_match_the_serial_chain(toy_results, case):
    results, _ = toy_results
    num_microbatches, vpp = CASES[case]
    losses, grads = serial_reference(num_microbatches, PP * vpp)
    last = results[PP - 1][case]
    torch.testing.assert_close(torch.stack(last["losses"]).sum(), torch.stack(losses).sum())
    torch.testing.assert_close(torch.stack(last["eval_losses"]).sum(), torch.stack(losses).sum())
    for rank in range(PP):
        assert results[rank][case]["losses"] == [] or rank == PP - 1  # only the last stage computes losses
        for chunk in range(vpp):
            torch.testing.assert_close(results[rank][case]["grads"][chunk], grads[chunk * PP + rank])


@pytest.mark.parametrize("case", [i for i, (_, vpp) in enumerate(CASES) if vpp == 1])
def test_1f1b_holds_at_most_pp_microbatches(toy_results, case):
    """Rank r holds min(pp - r, m) microbatches' activations at once: stage 0 never more than pp,
    however many microbatches the step has (all of them would be held without 1F1B)."""
    results, _ = toy_results
    num_microbatches = CASES[case][0]
    for rank in range(PP):
        held = results[rank][case]["stats"]["max_microbatches_in_flight"]
        assert held == min(PP - rank, num_microbatches), (rank, held)
    assert results[0][case]["stats"]["max_microbatches_in_flight"] <= PP


@pytest.mark.parametrize("case", [i for i, (_, vpp) in enumerate(CASES) if vpp > 1])
def test_interleaved_warmup_depth(toy_results, case):
    """Interleaving holds Megatron's warm-up depth plus one: 2 (pp - r - 1) + (vpp - 1) pp + 1."""
    results, _ = toy_results
    num_microbatches, vpp = CASES[case]
    for rank in range(PP):
        expected = min(2 * (PP - rank - 1) + (vpp - 1) * PP + 1, num_microbatches * vpp)
        assert results[rank][case]["stats"]["max_microbatches_in_flight"] == expected


def test_trace_has_forward_backward_and_p2p_events(toy_results):
    _, trace_dir = toy_results
    for rank in range(PP):
        with open(os.path.join(trace_dir, f"trace.rank{rank}.json")) as handle:
            events = [e for e in json.load(handle)["traceEvents"] if e["ph"] == "X"]
        compute = {e["name"] for e in events if e["tid"] == 0}
        p2p = {e["name"] for e in events if e["tid"] == 1}
        assert {"F0", "B0", "F7", "B7"} <= compute
        # with interleaving every rank (the last one too, round the ring) sends and receives both ways
        for direction in ("send_fwd", "recv_fwd", "send_bwd", "recv_bwd"):
            assert any(direction in name for name in p2p), (rank, direction, p2p)
        assert all(e["pid"] == rank and e["dur"] >= 0 for e in events)
