"""The gated backward with the adapters' thin products (``kernels/gated_lora_backward.py``).

h, dg and du must be ``lora_activations.gated_backward``'s to the bit (the same elementwise math); the five
products must be what a matmul of the stored 16-bit values gives with fp32 accumulation (only the order
of the sums differs). Shapes are chosen so that row groups, column splits, ranks and edges are all uneven.
"""
import pytest
import torch

import slothnb.kernels.gated_lora_backward as glb
from slothnb.kernels.lora_activations import gated_backward


def inputs(n, cols, ranks, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    rg, ru, rd = ranks
    xa = rnd(n, 8 + rg + ru + 8)  # the adapters' inputs are column views of a wider [X | x A^T ..] buffer
    return dict(dh=rnd(n, cols), g=rnd(n, cols), u=rnd(n, cols), xa_g=xa[:, 8:8 + rg], xa_u=xa[:, 8 + rg:8 + rg + ru],
                dyb=rnd(n, rd), B_g=rnd(cols, rg) * 0.2, B_u=rnd(cols, ru) * 0.2, A_d=rnd(rd, cols) * 0.2)


def gated_reference(activation, dh, g, u):
    """(h, dg, du) in float64."""
    from slothnb.kernels.lora_activations import _act_and_grad_torch

    act, dact = _act_and_grad_torch(activation, g.double())
    return act * u.double(), dh * u.double() * dact, dh * act


def close32(ours, ref, what):
    err = (ours - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item() + 1e-6, f"{what}: {err:.3e} (max |ref| {ref.abs().max().item():.3e})"


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "geglu_tanh"])
@pytest.mark.parametrize("n,cols,ranks,dtype", [
    (300, 200, (8, 12, 16), torch.bfloat16),  # 2 row groups (the second mostly empty), 13 splits, padded ranks
    (600, 130, (16, 16, 24), torch.float16),  # 3 row groups, a 2-column last split, rank 24 padded to 32
    (64, 64, (16, 16, 16), torch.bfloat16),  # one row group
])
@pytest.mark.parametrize("with_ad", [False, True])
def test_matches_the_gated_backward_and_the_matmuls(activation, n, cols, ranks, dtype, with_ad, device, monkeypatch):
    """Without ``A_d``: h, dg, du are the gated kernel's to the bit. With it (dh holding only ``dY W_d``, the
    kernel adding ``s (dY B_d) A_d`` in fp32): they match float64 to 16-bit rounding. Either way the five
    products are fp32 matmuls of the stored values."""
    monkeypatch.setattr(glb, "FUSED", True)
    t = inputs(n, cols, ranks, dtype, device)
    ad = dict(A_d=t["A_d"], scale_d=0.5) if with_ad else {}
    assert glb.applies(t["g"], t["u"], t["xa_g"], t["xa_u"], t["dyb"], t["B_g"], t["B_u"], ad.get("A_d"))
    g, u = t["g"].clone(), t["u"].clone()
    v_g, v_u = g._version, u._version
    h, dg, du, thin = glb.gated_lora_backward(activation, t["dh"].clone(), g, u, t["xa_g"], t["xa_u"], t["dyb"],
                                              t["B_g"], t["B_u"], **ad)
    assert dg is g and du is u and g._version > v_g and u._version > v_u  # written over, versions bumped
    if with_ad:
        dh64 = t["dh"].double() + 0.5 * t["dyb"].double() @ t["A_d"].double()
        for ours, ref in zip((h, dg, du), gated_reference(activation, dh64, t["g"], t["u"])):
            err = (ours.double() - ref).abs().max().item()
            assert err <= 8e-3 * ref.abs().max().item(), err  # one 16-bit rounding of each output
        h0, dg0, du0 = h, dg, du
    else:
        h0, dg0, du0 = gated_backward(activation, t["dh"].clone(), t["g"].clone(), t["u"].clone())
        assert torch.equal(h, h0) and torch.equal(dg, dg0) and torch.equal(du, du0)
    f = lambda x: x.float()  # noqa: E731  the stored 16-bit values, as a matmul reads them
    close32(thin.dyb_g, f(dg0) @ f(t["B_g"]), "dG B_g")
    close32(thin.dyb_u, f(du0) @ f(t["B_u"]), "dU B_u")
    close32(thin.dB_g, f(dg0).t() @ f(t["xa_g"]), "dG^T xa_g")
    close32(thin.dB_u, f(du0).t() @ f(t["xa_u"]), "dU^T xa_u")
    close32(thin.dA_d, f(t["dyb"]).t() @ f(h0), "dyb^T h")
    for name, shape in (("dyb_g", (n, ranks[0])), ("dyb_u", (n, ranks[1])), ("dB_g", (cols, ranks[0])),
                        ("dB_u", (cols, ranks[1])), ("dA_d", (ranks[2], cols))):
        got = getattr(thin, name)
        assert got.shape == shape and got.dtype == torch.float32 and got.is_contiguous(), name


def test_the_sums_are_the_same_bits_every_time(device, monkeypatch):
    """Partial sums added in a fixed order, no atomics: two runs give the same bits."""
    monkeypatch.setattr(glb, "FUSED", True)
    t = inputs(600, 200, (16, 16, 16), torch.bfloat16, device)
    runs = [glb.gated_lora_backward("swiglu", t["dh"].clone(), t["g"].clone(), t["u"].clone(), t["xa_g"], t["xa_u"],
                                    t["dyb"], t["B_g"], t["B_u"])[3] for _ in range(2)]
    for name in ("dyb_g", "dyb_u", "dB_g", "dB_u", "dA_d"):
        assert torch.equal(getattr(runs[0], name), getattr(runs[1], name)), name


def test_what_it_takes(device, monkeypatch):
    t = inputs(64, 64, (16, 16, 16), torch.bfloat16, device)
    args = lambda **kw: [kw.get(k, t[k]) for k in ("g", "u", "xa_g", "xa_u", "dyb", "B_g", "B_u")]  # noqa: E731
    monkeypatch.setattr(glb, "FUSED", False)
    assert not glb.applies(*args())  # opt-in
    monkeypatch.setattr(glb, "FUSED", True)
    assert glb.applies(*args())
    assert not glb.applies(*args(g=t["g"].float(), u=t["u"].float()))  # 16-bit only
    assert not glb.applies(*args(B_u=t["B_u"].float()))  # one dtype
    strided = torch.cat([t["g"], t["g"]], dim=1)[:, :64]  # the right shape, rows 128 apart
    assert not glb.applies(*args(g=strided))  # g is written in place as contiguous rows
    assert not glb.applies(*args(B_g=t["B_g"].t().contiguous().t()))
    wide = torch.zeros(64, glb.MAX_RANK + 16, dtype=torch.bfloat16, device=device)
    assert not glb.applies(*args(dyb=wide))  # the accumulators would not fit in registers
    assert glb.applies(*args(), t["A_d"])
    assert not glb.applies(*args(), t["A_d"].t())  # A_d [r_d, intermediate]


@pytest.mark.gpu
def test_gpu_llama_8b_shapes(monkeypatch):
    """The kernel compiled for the GPU at the 8B MLP's shapes (2 x 2,048 tokens, rank 16) gives what the
    gated backward and fp32 matmuls of the stored values give."""
    monkeypatch.setattr(glb, "FUSED", True)
    t = inputs(4096, 14336, (16, 16, 16), torch.bfloat16, "cuda")
    h0, dg0, du0 = gated_backward("swiglu", t["dh"].clone(), t["g"].clone(), t["u"].clone())
    h, dg, du, thin = glb.gated_lora_backward("swiglu", t["dh"].clone(), t["g"].clone(), t["u"].clone(), t["xa_g"],
                                              t["xa_u"], t["dyb"], t["B_g"], t["B_u"])
    assert torch.equal(h, h0) and torch.equal(dg, dg0) and torch.equal(du, du0)
    mm = lambda a, b: a.float() @ b.float()  # noqa: E731  (fp32 matmuls: no TF32 by default)
    for ours, ref, what in ((thin.dyb_g, mm(dg0, t["B_g"]), "dG B_g"), (thin.dyb_u, mm(du0, t["B_u"]), "dU B_u"),
                            (thin.dB_g, mm(dg0.t(), t["xa_g"]), "dG^T xa_g"),
                            (thin.dB_u, mm(du0.t(), t["xa_u"]), "dU^T xa_u"), (thin.dA_d, mm(t["dyb"].t(), h0), "dyb^T h")):
        err = (ours - ref).abs().max().item()
        assert err <= 1e-4 * ref.abs().max().item(), f"{what}: {err:.3e}"
    # with the down adapter's share of dh added in the kernel
    h, dg, du, _ = glb.gated_lora_backward("swiglu", t["dh"].clone(), t["g"].clone(), t["u"].clone(), t["xa_g"],
                                           t["xa_u"], t["dyb"], t["B_g"], t["B_u"], A_d=t["A_d"], scale_d=2.0)
    dh64 = t["dh"].double() + 2.0 * t["dyb"].double() @ t["A_d"].double()
    for ours, ref in zip((h, dg, du), gated_reference("swiglu", dh64, t["g"], t["u"])):
        assert (ours.double() - ref).abs().max().item() <= 8e-3 * ref.abs().max().item()
