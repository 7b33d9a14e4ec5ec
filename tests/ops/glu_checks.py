"""Checks shared by the GLU op tests (test_swiglu.py, test_geglu.py): float64 master inputs and a
forward + dgate + dup comparison against a float64 reference, with the in-place-backward check.

Tolerances: fp32 (CPU interpreter) 1e-5 abs / 1e-5 rel; bf16 2e-2/2e-2 and fp16 3e-3/3e-3 on GPU.
"""
import torch

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (3e-3, 3e-3)}


def glu_inputs(shape, device, seed=0):
    # Drawn where they are used: the GPU cases are 59M float64 elements, slow to draw on the CPU.
    g = torch.Generator(device=device).manual_seed(seed)
    gate = torch.randn(shape, generator=g, dtype=torch.float64, device=device) * 3  # deep into the tails
    up = torch.randn(shape, generator=g, dtype=torch.float64, device=device)
    return gate, up


def check_glu(fn, ref_fn, gate64, up64, dtype=torch.float32, make=lambda t: t * 1, expect_overwrite=None):
    """Runs ``fn`` on non-leaf copies (``make``) of the masters in ``dtype``; compares to float64."""
    gl, ul = gate64.to(dtype).requires_grad_(), up64.to(dtype).requires_grad_()
    gate, up = make(gl), make(ul)
    gate_ptr = gate.data_ptr()
    h = fn(gate, up)
    rg, ru = gl.detach().double().requires_grad_(), ul.detach().double().requires_grad_()
    ref = ref_fn(make(rg), make(ru))
    dh = torch.randn(ref.shape, generator=torch.Generator(device=h.device).manual_seed(5), dtype=torch.float64,
                     device=h.device)
    grads = {}
    gate.register_hook(lambda g: grads.update(gate=g.data_ptr()))
    h.backward(dh.to(dtype))
    ref.backward(dh.to(dtype).double())
    atol, rtol = TOL[dtype]
    assert h.shape == gate.shape and h.dtype == dtype
    torch.testing.assert_close(h.double(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(gl.grad.double(), rg.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(ul.grad.double(), ru.grad, atol=atol, rtol=rtol)
    if expect_overwrite is not None:
        assert (grads["gate"] == gate_ptr) == expect_overwrite
