"""The fused adapted linear over a frozen base on CUDA in bf16 (16-bit and NF4 bases, the NF4
one dequantised by csrc/nf4_dequantize.cu) equals the composed ops within bf16 rounding."""
import pytest
import torch

from tests.test_frozen_lora_linear import IN, OUT, adapted, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("base", ["16-bit", "nf4"])
def test_fused_equals_composed_in_bf16(base):
    fn, weight, bias = adapted(base, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2048, 2, IN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(2048, 2, OUT, device="cuda", dtype=torch.bfloat16)
    y, x_grad = run(fn, x, weight, bias, grad_out)
    assert type(y.grad_fn).__name__ == "_FrozenBaseLoRALinearBackward"
    grads = [fn.module.lora_A.grad.float(), fn.module.lora_B.grad.float()]
    fn.module.zero_grad(set_to_none=True)
    ref_y, ref_x_grad = run(fn.composed, x, weight, bias, grad_out)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=0)  # the same ops, in the same order
    torch.testing.assert_close(x_grad, ref_x_grad, rtol=1e-2, atol=1e-2)  # one rounding less in the sum
    torch.testing.assert_close(grads[0], fn.module.lora_A.grad.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grads[1], fn.module.lora_B.grad.float(), rtol=1e-2, atol=1e-2)
