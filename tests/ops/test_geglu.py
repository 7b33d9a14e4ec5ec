"""GeGLU kernels (exact erf and tanh GELU) vs a float64 reference: forward, dgate, dup on 2-D,
3-D, one-token and strided inputs, plus the in-place backward.

Tolerances: fp32 (CPU interpreter) 1e-5 abs / 1e-5 rel; bf16 2e-2/2e-2 and fp16 3e-3/3e-3 on GPU.
"""
import pytest
import torch

from slothnb.errors import ConfigError
from slothnb.kernels.geglu import geglu, geglu_reference

from glu_checks import check_glu, glu_inputs


def _pair(approximate, **kw):
    return (lambda a, b: geglu(a, b, approximate, **kw)), (lambda a, b: geglu_reference(a, b, approximate))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(3, 300), (2, 3, 1100), (1, 1, 64)])
def test_geglu_fp32_vs_float64(shape, approximate, device):
    gate, up = glu_inputs(shape, device)
    check_glu(*_pair(approximate), gate, up, expect_overwrite=True)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_geglu_strided_and_out_of_place(approximate, device):
    gate, up = glu_inputs((2, 4, 200), device, seed=1)
    check_glu(*_pair(approximate), gate, up, make=lambda t: (t * 1)[:, :, :150])
    check_glu(*_pair(approximate), gate, up, make=lambda t: (t * 1).transpose(0, 1))
    check_glu(*_pair(approximate, inplace_backward=False), gate, up, expect_overwrite=False)


def test_geglu_tanh_and_erf_really_differ(device):
    # The two forms differ by ~1e-3 near |g| ~ 2: a mixed-up flag would fail here.
    gate = torch.linspace(-4, 4, 64, device=device)
    up = torch.ones_like(gate)
    exact, tanh = geglu(gate, up, "none"), geglu(gate, up, "tanh")
    torch.testing.assert_close(exact, geglu_reference(gate, up, "none"), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(tanh, geglu_reference(gate, up, "tanh"), atol=1e-6, rtol=1e-6)
    assert (exact - tanh).abs().max() > 1e-4


def test_geglu_bad_approximate_raises():
    with pytest.raises(ConfigError, match="approximate"):
        geglu(torch.randn(2, 8), torch.randn(2, 8), approximate="sigmoid")


@pytest.mark.gpu
# Every dtype and every GELU form once (each pair is four Triton compilations at these shapes).
@pytest.mark.parametrize("dtype,approximate", [(torch.bfloat16, "tanh"), (torch.float16, "none")])
def test_geglu_gpu_real_size(dtype, approximate):
    gate, up = glu_inputs((4096, 14336), "cuda", seed=6)
    check_glu(*_pair(approximate), gate, up, dtype=dtype, expect_overwrite=True)
    gate, up = glu_inputs((2, 3, 14337), "cuda", seed=7)
    check_glu(*_pair(approximate), gate, up, dtype=dtype, make=lambda t: (t * 1).transpose(0, 1))
