"""The estimator's memory arithmetic on a model small enough to count by hand.

The `tiny` preset: 4 layers, hidden h=64, 4 heads of 16, 2 KV heads (kv = 32), SwiGLU ffn
f=176, vocab 512 (already a multiple of 128), seq 64, RMSNorm, untied embeddings, no biases.
"""
import dataclasses

import pytest

from engine import estimator as est
from models.config import ModelConfig, resolve_preset

GIB = 2**30


@pytest.fixture
def tiny():
    return resolve_preset(ModelConfig(preset="tiny"))


def test_parameter_count(tiny):
    # QKV 64*(64+2*32)=8192, proj 64*64=4096, gate+up 64*2*176=22528, down 176*64=11264, 2 norms 128
    assert est.layer_params(tiny) == 46208
    # 4 layers 184832 + embedding 512*64=32768 + final norm 64 + output layer 32768
    assert est.stage_params(tiny, est.Layout(), True, True) == 250432


def test_bf16_memory_one_gpu(tiny):
    layout = est.Layout(micro_batch=2, precision="bf16")
    memory = est.peak_memory(tiny, layout)
    assert memory.weights == 2 * 250432  # bf16 weights
    # fp32 main_grad 4 B/param; every 16-bit gradient of the untied model goes straight into it
    assert memory.gradients == 4 * 250432
    assert memory.optimizer == 12 * 250432  # fp32 master + two Adam moments
    # per layer, s*b = 64*2 = 128 tokens: norm inputs and QKV/fc1 inputs 128*64*(2+2+2+2) = 65536;
    # Q, K, V, attention output (= projection input) 128*(2*64+2*32)*2 = 49152;
    # SwiGLU gate and up, their product 128*176*3*2 = 135168 -> 249856 per layer, 4 layers
    assert memory.activations == 4 * 249856
    assert memory.logits == 128 * 512 * (4 + 2)  # one chunk (128 tokens < 2048): fp32 logits, bf16 gradient
    tensors = 500864 + 1001728 + 3005184 + 999424 + 393216
    assert memory.allowance == pytest.approx(tensors * 0.03 + 0.5 * GIB)
    assert memory.total == pytest.approx(tensors * 1.03 + 0.5 * GIB)


def test_tied_output_layer_holds_its_fp32_gradient_on_one_stage(tiny):
    """A weight tied to the embedding keeps its fp32 gradient (512x64) from the fused output
    layer's forward to its backward; an untied one's goes into main_grad, as does any under pp."""
    tied = dataclasses.replace(tiny, tie_embeddings=True)
    chunk = 128 * 512 * (4 + 2)
    assert est.logits_bytes(tied, est.Layout(micro_batch=2)) == chunk + 512 * 64 * 4
    assert est.logits_bytes(tied, est.Layout(micro_batch=2, pp=2)) == chunk
    assert est.logits_bytes(tiny, est.Layout(micro_batch=2)) == chunk


def test_tied_embedding_on_the_output_stage_holds_a_16_bit_gradient(tiny):
    """Such a table takes the plain lookup path: its bf16 .grad (512x64) exists beside main_grad."""
    tied = dataclasses.replace(tiny, tie_embeddings=True)
    one_stage = est.stage_memory(tied, est.Layout(micro_batch=2), True, True)
    assert one_stage.gradients == 4 * est.stage_params(tied, est.Layout(), True, True) + 2 * 512 * 64
    for first, last in ((True, False), (False, True)):  # pp 2: each stage's copy goes into main_grad
        layout = est.Layout(micro_batch=2, pp=2)
        assert est.stage_memory(tied, layout, first, last).gradients == 4 * est.stage_params(tied, layout, first, last)


def test_autocast_keeps_fp32_weights_and_residual_stream(tiny):
    memory = est.peak_memory(tiny, est.Layout(micro_batch=2, precision="bf16-autocast"))
    assert memory.weights == 4 * 250432 and memory.optimizer == 8 * 250432  # no master copy
    # norm inputs in fp32: 128*64*(4+4+2+2) = 98304 instead of 65536 per layer
    assert memory.activations == 4 * (98304 + 49152 + 135168)


def test_fp8_holds_the_layers_weight_copies(tiny):
    """FP8 keeps an e4m3 copy of each trained layer weight (both layouts, 2 bytes) for the step."""
    for tp in (1, 2):
        bf16 = est.stage_memory(tiny, est.Layout(tp=tp, micro_batch=2, precision="bf16"), True, True)
        fp8 = est.stage_memory(tiny, est.Layout(tp=tp, micro_batch=2, precision="fp8"), True, True)
        assert fp8.weights - bf16.weights == tiny.num_layers * est.layer_params(tiny) / tp * 2


def test_tensor_and_sequence_parallel_split(tiny):
    layout = est.Layout(tp=2, sp=True, dp=2, micro_batch=2, shard_optimizer=True)
    memory = est.peak_memory(tiny, layout)
    params = 4 * 46208 // 2 + 2 * 32768 // 2 + 64  # TP halves layers and vocab; the final norm is whole
    assert memory.weights == 2 * params
    assert memory.optimizer == 12 * params / 2  # sharded over DP=2
    assert memory.activations == 4 * 249856 / 2  # everything split over TP with SP
    no_sp = est.peak_memory(tiny, est.Layout(tp=2, micro_batch=2))
    assert no_sp.activations == 4 * (65536 + (49152 + 135168) / 2)  # [s,b,h] tensors replicated


def test_pipeline_in_flight_and_recompute(tiny):
    # PP=2, 8 microbatches: stage 0 holds 2 layers x 2 microbatches (1F1B warm-up = pp)
    layout = est.Layout(pp=2, micro_batch=2, global_batch=16)
    assert est.stage_memory(tiny, layout, True, False).activations == 2 * 249856 * 2
    # the last stage's peak holds one microbatch of its layers, plus the output layer's logits
    last = est.stage_memory(tiny, layout, False, True)
    assert last.activations == 2 * 249856 and last.logits == 128 * 512 * (4 + 2)
    # interleaved, vpp=2: pp * (1 + (pp-1)/(pp*vpp)) = 2.5 stage-equivalents
    interleaved = est.Layout(pp=2, vpp=2, micro_batch=2, global_batch=16)
    assert est.activation_bytes(tiny, interleaved) == 2 * 249856 * 2.5
    # full recompute keeps each layer's bf16 input (128*64*2 = 16384) per microbatch in flight,
    # plus one layer's activations while it is recomputed
    recompute = est.Layout(pp=2, micro_batch=2, global_batch=16, recompute="full")
    assert est.activation_bytes(tiny, recompute) == 2 * 16384 * 2 + 249856
    # on the last stage the logits chunk (393216 B) and the recomputed layer (249856 B) are
    # never alive together: only the larger one counts
    last = est.stage_memory(tiny, recompute, False, True)
    assert last.activations + last.logits == 2 * 16384 + 249856 + (393216 - 249856)


def test_step_time_compute_and_bubble(tiny):
    hw = est.Hardware(tflops=100.0, host_seconds_per_layer=0.0)
    layout = est.Layout(pp=2, micro_batch=2, global_batch=16)
    time = est.step_time(tiny, layout, hw)
    # 8 microbatches of 128 tokens; the last stage runs 2 of the 4 layers and the output layer
    output_layer = 6 * tiny.vocab_size * tiny.hidden_size
    stage = (tiny.flops_per_token() - output_layer) / 2 + output_layer
    assert time.compute == pytest.approx(stage * 8 * 2 * 64 / 100e12)
    assert time.bubble == pytest.approx(time.compute * 1 / 8)  # (p-1)/m


def test_host_time_bounds_a_stage_with_little_gpu_work(tiny):
    """A tiny model's GPU share is microseconds: each micro-batch then costs the host's time per
    layer on the stage (2 of the 4 layers at pp=2), and under SP a bit more."""
    hw = est.Hardware(tflops=100.0, host_seconds_per_layer=1e-3)
    time = est.step_time(tiny, est.Layout(pp=2, micro_batch=2, global_batch=16), hw)
    assert time.compute == pytest.approx(8 * 2 * 1e-3)
    sp = est.step_time(tiny, est.Layout(tp=2, sp=True, micro_batch=2, global_batch=16), hw)
    assert sp.compute == pytest.approx(8 * 4 * 1e-3 * est.HOST_SP_FACTOR)


def test_cuda_graphs_lift_the_host_floor_without_pipelining(tiny):
    hw = est.Hardware(tflops=100.0, host_seconds_per_layer=1e-3)
    graphed = est.step_time(tiny, est.Layout(tp=2, micro_batch=2, global_batch=16, cuda_graphs=True), hw)
    assert graphed.compute < 1e-3  # the GPU's own share only
    # A pipeline cannot use the graphs (config validation refuses it): the floor stays.
    staged = est.step_time(tiny, est.Layout(pp=2, micro_batch=2, global_batch=16, cuda_graphs=True), hw)
    assert staged.compute == pytest.approx(8 * 2 * 1e-3)


def test_plan_only_lists_layouts_that_fit(tiny):
    results = est.plan(tiny, 8, 16, est.Hardware(gpu_mem_gib=0.52))
    assert results and all(memory.total <= 0.52 * GIB for _, _, memory, _ in results)
    assert [r[0] for r in results] == sorted((r[0] for r in results), reverse=True)


def test_dpo_adds_the_reference_copy_and_its_forward(tiny):
    """DPO: one more copy of the weights, the reference forward (a third of training's FLOPs)
    and the output layer's forward again in backward; batches are given in pairs."""
    from tools.estimate import build_layout, parse_cli

    hw = est.Hardware(tflops=100.0, host_seconds_per_layer=0.0)
    lm = est.Layout(micro_batch=4, global_batch=4)
    dpo = dataclasses.replace(lm, objective="dpo")
    assert est.peak_memory(tiny, dpo).weights == 2 * est.peak_memory(tiny, lm).weights
    output_recompute = 2 * tiny.vocab_size * tiny.hidden_size * 4 * tiny.seq_length
    assert est.step_time(tiny, dpo, hw).compute == pytest.approx(
        est.step_time(tiny, lm, hw).compute * 4 / 3 + output_recompute / 100e12)
    layout = build_layout(parse_cli(["--preset", "tiny", "--micro-batch", "2", "--global-batch", "8", "--objective", "dpo"]))
    assert (layout.micro_batch, layout.global_batch, layout.objective) == (4, 16, "dpo")
    assert est.describe(layout) == "tp1 pp1 dp1 mb2 gb8 dpo bf16"


def test_reference_free_pairs_count_no_reference(tiny):
    """SimPO / ORPO: pairs and the output layer's recompute as in DPO, but one copy of the
    weights and no reference forward."""
    hw = est.Hardware(tflops=100.0, host_seconds_per_layer=0.0)
    lm = est.Layout(micro_batch=4, global_batch=4)
    free = dataclasses.replace(lm, objective="dpo-no-reference")
    assert est.peak_memory(tiny, free).weights == est.peak_memory(tiny, lm).weights
    output_recompute = 2 * tiny.vocab_size * tiny.hidden_size * 4 * tiny.seq_length
    assert est.step_time(tiny, free, hw).compute == pytest.approx(
        est.step_time(tiny, lm, hw).compute + output_recompute / 100e12)
    assert est.sequences_per_sample("dpo-no-reference") == 2
