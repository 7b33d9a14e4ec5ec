"""SwiGLU kernels vs a float64 reference: forward, dgate, dup (2-D, 3-D, one token, strided
views), the in-place backward (grads written into the gate/up buffers) and its safety rules.

Tolerances: fp32 (CPU interpreter) 1e-5 abs / 1e-5 rel; bf16 2e-2/2e-2 and fp16 3e-3/3e-3 on GPU.
"""
import pytest
import torch

from slothnb.errors import ConfigError
from slothnb.kernels.swiglu import swiglu, swiglu_reference

from glu_checks import check_glu, glu_inputs


@pytest.mark.parametrize("shape", [(3, 300), (2, 3, 1100), (1, 1, 64), (1, 7)])
def test_swiglu_fp32_vs_float64(shape, device):
    gate, up = glu_inputs(shape, device)
    check_glu(swiglu, swiglu_reference, gate, up, expect_overwrite=True)


def test_swiglu_strided_views(device):
    gate, up = glu_inputs((2, 4, 200), device, seed=1)
    check_glu(swiglu, swiglu_reference, gate, up, make=lambda t: (t * 1)[:, :, :150])
    check_glu(swiglu, swiglu_reference, gate, up, make=lambda t: (t * 1).transpose(0, 1))
    check_glu(swiglu, swiglu_reference, gate, up, make=lambda t: (t * 1)[..., ::2])


def test_swiglu_fused_gate_up_chunk_is_not_overwritten_in_place(device):
    # gate/up as halves of one buffer (Phi-3 style): overlapping spans, so no in-place backward.
    g = torch.Generator().manual_seed(2)
    gu = torch.randn(5, 2 * 96, generator=g, dtype=torch.float64).to(device)
    leaf = gu.float().requires_grad_()
    gate, up = (leaf * 1).chunk(2, dim=-1)
    h = swiglu(gate, up)
    ref_leaf = gu.clone().requires_grad_()
    ref = swiglu_reference(*ref_leaf.chunk(2, dim=-1))
    h.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, atol=1e-5, rtol=1e-5)


def test_swiglu_leaf_inputs_keep_their_values(device):
    gate, up = glu_inputs((4, 50), device, seed=3)
    gate, up = gate.float().requires_grad_(), up.float().requires_grad_()
    before = gate.detach().clone()
    swiglu(gate, up).sum().backward()
    torch.testing.assert_close(gate.detach(), before, atol=0, rtol=0)  # a parameter is never overwritten


def test_swiglu_in_place_backward_is_loud_if_gate_was_saved_elsewhere(device):
    gate, up = glu_inputs((2, 40), device, seed=4)
    gl = gate.float().requires_grad_()
    g = gl * 1
    other = g * g  # saves g; runs its backward after swiglu's
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (swiglu(g, up.float().requires_grad_() * 1).sum() + other.sum()).backward()
    check_glu(lambda a, b: swiglu(a, b, inplace_backward=False), swiglu_reference, gate, up,
              expect_overwrite=False)


def test_swiglu_shape_mismatch_raises():
    with pytest.raises(ConfigError, match="same shape"):
        swiglu(torch.randn(2, 8), torch.randn(2, 9))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swiglu_gpu_real_size(dtype):
    gate, up = glu_inputs((4096, 14336), "cuda", seed=6)
    check_glu(swiglu, swiglu_reference, gate, up, dtype=dtype, expect_overwrite=True)
    gate, up = glu_inputs((2, 3, 14337), "cuda", seed=7)
    check_glu(swiglu, swiglu_reference, gate, up, dtype=dtype, make=lambda t: (t * 1).transpose(0, 1))
