"""``thin_mm``: torch.mm's result, with cuBLASLt preferred for that call only on CUDA."""
import pytest
import torch

from slothnb.kernels import thin_matmul


def test_cpu_is_plain_mm_with_out_and_strided_out():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 32, generator=g), torch.randn(8, 32, generator=g)
    assert torch.equal(thin_matmul.thin_mm(a, b.t()), a @ b.t())
    wide = torch.zeros(64, 48)
    thin_matmul.thin_mm(a, b.t(), out=wide[:, 16:24])  # a column slice, as the widened LoRA input writes it
    assert torch.equal(wide[:, 16:24], a @ b.t())
    assert wide[:, :16].abs().sum() == 0 and wide[:, 24:].abs().sum() == 0
    with pytest.raises(RuntimeError):
        thin_matmul.thin_mm(a, b)  # shapes that do not chain: torch.mm's own error


class _Cuda:
    is_cuda = True


@pytest.fixture
def fake_backend(monkeypatch):
    """The process-wide preference as a plain value (a CPU build refuses cuBLASLt), and a matmul that
    records which preference it ran under."""
    state = {"backend": "cublas", "seen": []}
    monkeypatch.setattr(thin_matmul, "_AVAILABLE", True)
    monkeypatch.setattr(thin_matmul, "_CUBLASLT", "cublaslt")
    monkeypatch.setattr(thin_matmul, "_get_backend", lambda: state["backend"])
    monkeypatch.setattr(thin_matmul, "_set_backend", lambda b: state.update(backend=b))

    def mm(a, b, out, out_dtype):
        state["seen"].append((state["backend"], out, out_dtype))
        if b == "boom":
            raise RuntimeError("boom")
        return "product"

    monkeypatch.setattr(thin_matmul, "_mm", mm)
    return state


def test_prefers_cublaslt_for_its_call_only_and_restores_on_error(fake_backend, monkeypatch):
    assert thin_matmul.thin_mm(_Cuda(), "b", out_dtype=torch.float32) == "product"
    assert fake_backend["seen"] == [("cublaslt", None, torch.float32)]
    assert fake_backend["backend"] == "cublas"  # put back
    with pytest.raises(RuntimeError, match="boom"):
        thin_matmul.thin_mm(_Cuda(), "boom")
    assert fake_backend["backend"] == "cublas"
    fake_backend["backend"] = "cublaslt"  # the user's own preference: left as it is
    thin_matmul.thin_mm(_Cuda(), "b")
    assert fake_backend["backend"] == "cublaslt"
    fake_backend["backend"] = "cublas"
    monkeypatch.setattr(thin_matmul, "LT", False)  # switched off: torch's choice
    thin_matmul.thin_mm(_Cuda(), "b", out="o")
    assert fake_backend["seen"][-1] == ("cublas", "o", None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cublas_and_leaves_the_preference():
    torch.manual_seed(0)
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    dY = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    before = torch.backends.cuda.preferred_blas_library()
    got = thin_matmul.thin_mm(x, A.t())
    assert torch.backends.cuda.preferred_blas_library() == before
    ref = (x.double() @ A.double().t())
    assert torch.allclose(got.double(), ref, rtol=1e-2, atol=1e-1)
    grad = thin_matmul.thin_mm(dY.t(), got, out_dtype=torch.float32)  # an adapter gradient in fp32
    assert grad.dtype == torch.float32
    assert torch.allclose(grad.double(), dY.double().t() @ got.double(), rtol=1e-3, atol=1.0)
    wide = torch.zeros(4096, 4096 + 64, device="cuda", dtype=torch.bfloat16)
    thin_matmul.thin_mm(x, A.t(), out=wide[:, 4096:4112])
    assert torch.allclose(wide[:, 4096:4112].double(), ref, rtol=1e-2, atol=1e-1)
    assert wide[:, 4112:].abs().sum() == 0 and wide[:, :4096].abs().sum() == 0
