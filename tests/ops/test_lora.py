"""Fused LoRA ops against a float64 plain-autograd composition (what peft computes).

Every check compares outputs and the gradients of x, A and B. NF4 bases use bitsandbytes' own
dequantised weight (in float64) as the reference W, so the NF4 path is checked end to end. Errors
are measured relative to the largest reference magnitude; tolerances per compute dtype below.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

bnbf = pytest.importorskip("bitsandbytes.functional")

from slothnb.errors import ConfigError  # noqa: E402
from slothnb.kernels.lora import LoraWeights, lora_linear, lora_mlp, lora_qkv  # noqa: E402

TOL = {torch.float64: 1e-12, torch.float32: 3e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
ACT_REF = {"swiglu": F.silu, "geglu": F.gelu, "geglu_tanh": lambda t: F.gelu(t, approximate="tanh")}


def pair(out_f, in_f, base="16bit", dtype=torch.float64, ab_dtype=None, r=8, scale=2.0, seed=0, device="cpu"):
    """(LoraWeights for the fused op, float64 reference leaves with the same values)."""
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn on the GPU there: 8B shapes are 59M values
    w = torch.randn(out_f, in_f, generator=gen, device=device) * in_f ** -0.5
    A = torch.randn(r, in_f, generator=gen, device=device) * in_f ** -0.5
    B = torch.randn(out_f, r, generator=gen, device=device) * 0.2  # non-zero, so A gets a gradient
    if base == "nf4":
        weight, state = bnbf.quantize_4bit(w.to(device), quant_type="nf4",  # fp32 state: exact reference W
                                           compress_statistics=True, blocksize=64)
        dense = bnbf.dequantize_4bit(weight, state).double()
    else:
        weight, state = w.to(dtype).to(device), None
        dense = weight.double()
    ab = ab_dtype or dtype
    p = LoraWeights(weight, state, A.to(device, ab).requires_grad_(), B.to(device, ab).requires_grad_(), scale)
    ref = SimpleNamespace(W=dense, A=p.A.detach().double().requires_grad_(), B=p.B.detach().double().requires_grad_(),
                          scale=scale)
    return p, ref


def ref_proj(x, q):
    return x @ q.W.t() + q.scale * (x @ q.A.t()) @ q.B.t()


def make_x(case, in_f, dtype, device="cpu", seed=1):
    """(x in dtype, the same values in float64): two separate leaves of the requested layout."""
    gen = torch.Generator().manual_seed(seed)
    shape = {"2d": (7, in_f), "3d": (2, 3, in_f), "one_token": (1, 1, in_f), "noncontig": (3, 2, 2 * in_f),
             "batch": (2, 256, in_f)}[case]
    raw = torch.randn(shape, generator=gen).to(device)

    def leaf(t):
        t = t.clone()
        if case == "noncontig":  # every other feature of a wider buffer, batch-major view
            t = t[..., ::2].transpose(0, 1)
            assert not t.is_contiguous()
        return t.requires_grad_()

    return leaf(raw.to(dtype)), leaf(raw.double())


def close(ours, ref, tol, what):
    assert ours.shape == ref.shape, what
    err = (ours.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * scale + 1e-30, f"{what}: max error {err:.3e} vs max |ref| {scale:.3e} (tol {tol})"


def compare(outs, refs, leaves, ref_leaves, dtype, seed=2):
    """Backprop the same random cotangent through both, then compare outputs and leaf gradients."""
    gen = torch.Generator().manual_seed(seed)
    dys = [torch.randn(r.shape, generator=gen).to(r.device, torch.float64) for r in refs]
    tol = TOL[dtype]
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.dtype == dtype
        close(o, r, tol, f"output {i}")
    torch.autograd.backward(list(outs), [d.to(o.dtype) for d, o in zip(dys, outs)])
    torch.autograd.backward(list(refs), dys)
    for i, (leaf, ref_leaf) in enumerate(zip(leaves, ref_leaves)):
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, f"grad {i}"
        close(leaf.grad, ref_leaf.grad, tol, f"grad {i} of shape {tuple(leaf.shape)}")


@pytest.mark.parametrize("base", ["16bit", "nf4"])
@pytest.mark.parametrize("case", ["2d", "3d", "one_token", "noncontig"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_lora_linear(base, case, dtype):
    p, ref = pair(96, 64, base, dtype)
    x, x64 = make_x(case, 64, dtype)
    y = lora_linear(x, p)
    assert y.shape == (*x.shape[:-1], 96) and type(y.grad_fn).__name__ == "LoraLinearFunctionBackward"
    compare([y], [ref_proj(x64, ref)], [x, p.A, p.B], [x64, ref.A, ref.B], dtype)


@pytest.mark.parametrize("base", ["16bit", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_lora_qkv_gqa_shapes(base, dtype):
    (q, rq), (k, rk), (v, rv) = (pair(o, 64, base, dtype, seed=s) for o, s in ((128, 0), (64, 1), (64, 2)))
    x, x64 = make_x("3d", 64, dtype)
    outs = lora_qkv(x, q, k, v)
    assert [o.shape[-1] for o in outs] == [128, 64, 64]
    assert outs[0].grad_fn is outs[2].grad_fn  # one autograd node
    refs = [ref_proj(x64, r) for r in (rq, rk, rv)]
    compare(outs, refs, [x, q.A, q.B, k.A, k.B, v.A, v.B], [x64, rq.A, rq.B, rk.A, rk.B, rv.A, rv.B], dtype)


@pytest.mark.parametrize("base", ["16bit", "nf4"])
def test_shared_input_projections_with_their_own_ranks_scales_and_dtypes(base):
    """q/k/v (and gate/up) take their adapter gradients from one matmul over all of them: each keeps its
    own rank and scale, and A's of different dtypes get their gradients in their own dtypes. Both match float64."""
    dtype = torch.float64
    (q, rq), (k, rk), (v, rv) = (pair(o, 64, base, dtype, r=r, scale=sc, seed=s)
                                 for o, r, sc, s in ((128, 4, 0.5, 0), (64, 8, 1.0, 1), (64, 2, 3.0, 2)))
    x, x64 = make_x("3d", 64, dtype)
    refs = [ref_proj(x64, r) for r in (rq, rk, rv)]
    compare(lora_qkv(x, q, k, v), refs, [x, q.A, q.B, k.A, k.B, v.A, v.B],
            [x64, rq.A, rq.B, rk.A, rk.B, rv.A, rv.B], dtype)

    (g, rg), (u, ru), (d, rd) = (pair(o, i, base, dtype, r=r, scale=sc, seed=s)
                                 for o, i, r, sc, s in ((128, 64, 4, 2.0, 3), (128, 64, 6, 0.25, 4), (64, 128, 4, 1.0, 5)))
    u = LoraWeights(u.weight, u.quant_state, u.A.detach().float().requires_grad_(), u.B, u.scale)  # fp32 A: own path
    ru.A = u.A.detach().double().requires_grad_()
    x, x64 = make_x("3d", 64, dtype)
    y = lora_mlp(x, g, u, d)
    ref = ref_proj(F.silu(ref_proj(x64, rg)) * ref_proj(x64, ru), rd)
    close(y, ref, TOL[dtype], "output")
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    y.backward(dy)
    ref.backward(dy)
    for leaf, ref_leaf in zip([x, g.A, g.B, u.A, u.B, d.A, d.B], [x64, rg.A, rg.B, ru.A, ru.B, rd.A, rd.B]):
        assert leaf.grad.dtype == leaf.dtype
        close(leaf.grad, ref_leaf.grad, TOL[leaf.dtype], f"grad of shape {tuple(leaf.shape)}")


def mlp_case(base, dtype, activation, case="3d", ab_dtype=None, hidden=64, inter=128):
    (g, rg), (u, ru), (d, rd) = (pair(o, i, base, dtype, ab_dtype, seed=s)
                                 for o, i, s in ((inter, hidden, 0), (inter, hidden, 1), (hidden, inter, 2)))
    x, x64 = make_x(case, hidden, dtype)
    y = lora_mlp(x, g, u, d, activation=activation)
    ref = ref_proj(ACT_REF[activation](ref_proj(x64, rg)) * ref_proj(x64, ru), rd)
    leaves = [x, g.A, g.B, u.A, u.B, d.A, d.B]
    return y, ref, leaves, [x64, rg.A, rg.B, ru.A, ru.B, rd.A, rd.B]


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "geglu_tanh"])
@pytest.mark.parametrize("base", ["16bit", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_lora_mlp(activation, base, dtype):
    y, ref, leaves, ref_leaves = mlp_case(base, dtype, activation)
    assert type(y.grad_fn).__name__ == "LoraMLPFunctionBackward"
    compare([y], [ref], leaves, ref_leaves, dtype)


@pytest.mark.parametrize("case", ["2d", "one_token", "noncontig"])
def test_lora_mlp_input_layouts(case):
    y, ref, leaves, ref_leaves = mlp_case("nf4", torch.float32, "swiglu", case)
    compare([y], [ref], leaves, ref_leaves, torch.float32)


def test_fp32_adapters_on_bf16_activations_keep_their_dtype():
    y, ref, leaves, ref_leaves = mlp_case("nf4", torch.bfloat16, "swiglu", ab_dtype=torch.float32)
    assert [t.dtype for t in leaves] == [torch.bfloat16] + [torch.float32] * 6
    compare([y], [ref], leaves, ref_leaves, torch.bfloat16)  # checks every grad's dtype == its leaf's


def test_autocast_runs_in_the_autocast_dtype():
    p, ref = pair(96, 64, "16bit", torch.bfloat16, ab_dtype=torch.float32)
    x, x64 = make_x("3d", 64, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, p)
    assert y.dtype == torch.bfloat16
    y.backward(torch.ones_like(y))
    ref_proj(x64, ref).backward(torch.ones(y.shape, dtype=torch.float64))
    assert x.grad.dtype == torch.float32 and p.A.grad.dtype == torch.float32
    for ours, r in ((y, ref_proj(x64, ref)), (x.grad, x64.grad), (p.A.grad, ref.A.grad), (p.B.grad, ref.B.grad)):
        close(ours, r, TOL[torch.bfloat16], "autocast")


def test_input_without_grad_still_trains_the_adapters():
    (q, rq), (k, rk), (v, rv) = (pair(64, 64, "nf4", seed=s) for s in range(3))
    x, x64 = make_x("2d", 64, torch.float64)
    x.requires_grad_(False)
    x64.requires_grad_(False)
    outs = lora_qkv(x, q, k, v)
    compare(outs, [ref_proj(x64, r) for r in (rq, rk, rv)], [q.A, k.B, v.A], [rq.A, rk.B, rv.A], torch.float64)


def test_nothing_dense_is_kept_between_forward_and_backward():
    y, *_ = mlp_case("nf4", torch.float32, "swiglu", case="2d")  # 7 tokens, hidden 64, inter 128
    saved = y.grad_fn.saved_tensors
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes.count((7, 128)) == 2 and (7, 80) in shapes  # G, U and [x | x A_g^T | x A_u^T] (r 8 each)
    assert all(t.numel() < 128 * 64 for t in saved)  # never a [128, 64] dequantised weight
    p, _ = pair(96, 64, "nf4", torch.float32)
    x, _ = make_x("2d", 64, torch.float32)
    assert [tuple(t.shape) for t in lora_linear(x, p).grad_fn.saved_tensors] == [(7, 64), (7, 8), (8, 64), (96, 8)]


@pytest.mark.parametrize("ranks", [(8, 8, 8), (3, 5, 16)])  # odd ranks: padded row strides
def test_adapter_in_gemm_matches_the_two_matmul_form(ranks, monkeypatch):
    """NF4 projections sharing x run as one matmul ``[x | xa_1 ..] @ [W | 0 | s B]^T``
    (``ADAPTER_IN_GEMM``); it gives what ``x W^T + s (x A^T) B^T`` gives, outputs and gradients."""
    import slothnb.kernels.lora_widened as widened_mod

    results = []
    for fused in (True, False):
        monkeypatch.setattr(widened_mod, "ADAPTER_IN_GEMM", fused)
        (q, _), (k, _), (v, _) = (pair(o, 64, "nf4", torch.float64, r=r, seed=s)
                                  for s, (o, r) in enumerate(zip((64, 32, 32), ranks)))
        (g, _), (u, _), (d, _) = (pair(o, i, "nf4", torch.float64, r=r, seed=s)
                                  for s, (o, i, r) in enumerate(((128, 64, ranks[1]), (128, 64, ranks[2]),
                                                                 (64, 128, ranks[0]))))
        x, _ = make_x("noncontig", 64, torch.float64)
        outs = list(lora_qkv(x, q, k, v)) + [lora_mlp(x, g, u, d)]
        kept = [o.grad_fn.saved_tensors[0].shape[1] for o in (outs[0], outs[3])]  # x, or x beside its x A^T
        pad = widened_mod._padded
        assert kept == ([pad(64 + sum(ranks)), pad(64 + ranks[1] + ranks[2])] if fused else [64, 64])
        gen = torch.Generator().manual_seed(3)
        torch.autograd.backward(outs, [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs])
        results.append([o.detach() for o in outs] + [t.grad for t in (x, q.A, q.B, k.A, k.B, v.A, v.B,
                                                                      g.A, g.B, u.A, u.B, d.A, d.B)])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ranks", [(8, 8, 8), (3, 5, 16)])
def test_fused_qkv_is_one_matmul_and_gives_what_three_give(ranks, monkeypatch):
    """``FUSED_QKV``: q, k and v (NF4) from one matmul against their stacked widened weights, as column
    blocks of one output that are not views (RoPE may rotate them in place); the backward's ``dY W`` is
    one matmul too. Outputs and gradients are those of three separate projections."""
    import slothnb.kernels.lora as lora_mod
    import slothnb.kernels.lora_widened as widened_mod

    matmuls = []
    real_mm = torch.mm
    monkeypatch.setattr(widened_mod.torch, "mm", lambda *a, **kw: matmuls.append(a[1].shape) or real_mm(*a, **kw))
    results = []
    for fused in (True, False):
        monkeypatch.setattr(widened_mod, "FUSED_QKV", fused)
        ps = [pair(o, 64, "nf4", torch.float64, r=r, seed=s)[0] for s, (o, r) in enumerate(zip((64, 32, 32), ranks))]
        x, _ = make_x("3d", 64, torch.float64)
        matmuls.clear()
        q, k, v = lora_qkv(x, *ps)
        # x A^T for all three, then one matmul (fused) or one each
        assert len(matmuls) == (2 if fused else 4)
        if fused:
            assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
            assert all(t._base is None for t in (q, k, v)) and q.stride() == (3 * 128, 128, 1)
            assert (k.storage_offset(), v.storage_offset()) == (64, 96)
            assert q.grad_fn.fused
        gen = torch.Generator().manual_seed(3)
        stacked = []
        real_stacked = lora_mod.backward_stacked_base
        monkeypatch.setattr(lora_mod, "backward_stacked_base", lambda *a: stacked.append(1) or real_stacked(*a))
        torch.autograd.backward([q, k, v], [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (q, k, v)])
        assert len(stacked) == (1 if fused else 0)
        results.append([t.detach() for t in (q, k, v)] + [t.grad for t in (x, *(w for p in ps for w in (p.A, p.B)))])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_second_backward_through_overwritten_buffers_fails_loudly():
    y, *_ = mlp_case("16bit", torch.float32, "swiglu")  # fused in-place activation backward
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()


def test_bad_input_is_refused():
    p, _ = pair(96, 64)
    x = torch.randn(3, 64, dtype=torch.float64)
    with pytest.raises(ConfigError, match="shapes do not chain"):
        lora_linear(torch.randn(3, 32, dtype=torch.float64), p)
    frozen_not = LoraWeights(p.weight.clone().requires_grad_(), None, p.A, p.B, 1.0)
    with pytest.raises(ConfigError, match="frozen"):
        lora_linear(x, frozen_not)
    g, _ = pair(128, 64)
    u, _ = pair(96, 64)
    d, _ = pair(64, 128)
    with pytest.raises(ConfigError, match="same width"):
        lora_mlp(x, g, u, d)
    with pytest.raises(ConfigError, match="activation"):
        lora_mlp(x, g, g, d, activation="relu")


# ----------------------------------------------------------------------------- GPU, Llama-8B shapes
def _gpu_check(run, dtype):
    """Our error vs float64 must be no worse than a plain same-dtype composition's (peft's numerics)."""
    outs, refs, leaves, ref_leaves, plain_outs, plain_leaves = run()
    gen = torch.Generator(device="cuda").manual_seed(3)
    dys = [torch.randn(r.shape, generator=gen, device="cuda", dtype=torch.float64) for r in refs]
    torch.autograd.backward(list(outs), [d.to(dtype) for d in dys])
    torch.autograd.backward(list(refs), dys)
    torch.autograd.backward(list(plain_outs), [d.to(dtype) for d in dys])
    pairs = list(zip(outs, plain_outs, refs)) + [(a.grad, b.grad, c.grad) for a, b, c in zip(leaves, plain_leaves, ref_leaves)]
    for i, (ours, plain, ref) in enumerate(pairs):
        err = (ours.double() - ref).abs().max().item()
        err_plain = (plain.double() - ref).abs().max().item()
        assert err <= 2 * err_plain + 1e-6 * ref.abs().max().item(), f"tensor {i}: {err:.3e} vs plain {err_plain:.3e}"


def _plain(x, p):
    W = bnbf.dequantize_4bit(p.weight, p.quant_state).to(x.dtype) if p.quant_state is not None else p.weight
    return x @ W.t() + p.scale * (x @ p.A.t()) @ p.B.t()


def _leaf_copy(p):
    return LoraWeights(p.weight, p.quant_state, p.A.detach().clone().requires_grad_(),
                       p.B.detach().clone().requires_grad_(), p.scale)


@pytest.mark.gpu
# Both bases in bf16 (the QLoRA default), NF4 in fp16 too (pre-Ampere cards); 16-bit fp16 adds only
# another dtype specialisation of the same kernels.
@pytest.mark.parametrize("base,dtype", [("16bit", torch.bfloat16), ("nf4", torch.bfloat16), ("nf4", torch.float16)])
def test_gpu_lora_mlp_llama_8b(base, dtype):
    def run():
        (g, rg), (u, ru), (d, rd) = (pair(o, i, base, dtype, r=16, seed=s, device="cuda")
                                     for o, i, s in ((14336, 4096, 0), (14336, 4096, 1), (4096, 14336, 2)))
        x, x64 = make_x("batch", 4096, dtype, device="cuda")
        y = lora_mlp(x, g, u, d)
        ref = ref_proj(F.silu(ref_proj(x64, rg)) * ref_proj(x64, ru), rd)
        xp, gp, up, dp = x.detach().clone().requires_grad_(), _leaf_copy(g), _leaf_copy(u), _leaf_copy(d)
        plain = _plain(F.silu(_plain(xp, gp)) * _plain(xp, up), dp)
        return ([y], [ref], [x, g.A, g.B, u.A, u.B, d.A, d.B], [x64, rg.A, rg.B, ru.A, ru.B, rd.A, rd.B],
                [plain], [xp, gp.A, gp.B, up.A, up.B, dp.A, dp.B])
    _gpu_check(run, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("base", ["16bit", "nf4"])
def test_gpu_lora_qkv_llama_8b(base):
    dtype = torch.bfloat16

    def run():
        parts = [pair(o, 4096, base, dtype, r=16, seed=s, device="cuda") for o, s in ((4096, 0), (1024, 1), (1024, 2))]
        x, x64 = make_x("batch", 4096, dtype, device="cuda")
        outs = lora_qkv(x, *[p for p, _ in parts])
        refs = [ref_proj(x64, r) for _, r in parts]
        xp = x.detach().clone().requires_grad_()
        copies = [_leaf_copy(p) for p, _ in parts]
        plain = [_plain(xp, c) for c in copies]
        leaves = [x] + [t for p, _ in parts for t in (p.A, p.B)]
        ref_leaves = [x64] + [t for _, r in parts for t in (r.A, r.B)]
        return outs, refs, leaves, ref_leaves, plain, [xp] + [t for c in copies for t in (c.A, c.B)]
    _gpu_check(run, dtype)



def test_fused_outputs_are_not_views():
    """lora_qkv outputs are plain tensors, so RoPE may rotate them in place under autograd."""
    ps = [pair(n, 64, seed=s)[0] for s, n in enumerate((64, 32, 32))]
    x = torch.randn(2, 3, 64, dtype=torch.float64, requires_grad=True)
    outs = lora_qkv(x, *ps)
    assert all(o._base is None and o.shape == (2, 3, p.out_features) for o, p in zip(outs, ps))
    assert lora_linear(x, ps[0])._base is None


@pytest.mark.parametrize("h_chunk_bytes", [64 << 20, 512])  # 512 bytes: h A_d^T over 3 row chunks of 2 rows
@pytest.mark.parametrize("base", ["16bit", "nf4"])
def test_lora_mlp_without_output_gives_the_same_gradients(base, h_chunk_bytes, monkeypatch):
    """output_needed=False (a checkpoint's recompute): no down-projection base matmul or dequantisation,
    and h is never whole (``h A_d^T`` by row chunks), yet the backward from the same dy is bit-identical
    to the full forward's."""
    import slothnb.kernels.lora as lora_mod

    monkeypatch.setattr(lora_mod, "H_CHUNK_BYTES", h_chunk_bytes)
    grads = []
    for needed in (True, False):
        (g, _), (u, _), (d, _) = (pair(o, i, base, torch.float32, seed=s)
                                  for o, i, s in ((128, 64, 0), (128, 64, 1), (64, 128, 2)))
        x, _ = make_x("3d", 64, torch.float32)
        bases = []
        real_base = lora_mod._base
        monkeypatch.setattr(lora_mod, "_base", lambda w, qs, dt: bases.append(w) or real_base(w, qs, dt))
        y = lora_mlp(x, g, u, d, output_needed=needed)
        forward_bases = list(bases)
        monkeypatch.setattr(lora_mod, "_base", real_base)
        assert y.shape == (2, 3, 64)
        assert any(w is d.weight for w in forward_bases) == needed  # down's W is not even dequantised
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
        grads.append([t.grad.clone() for t in (x, g.A, g.B, u.A, u.B, d.A, d.B)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    if h_chunk_bytes == 512:  # and the chunks give what the whole h gives
        monkeypatch.setattr(lora_mod, "H_CHUNK_BYTES", 64 << 20)
        (g, _), (u, _), (d, _) = (pair(o, i, base, torch.float32, seed=s)
                                  for o, i, s in ((128, 64, 0), (128, 64, 1), (64, 128, 2)))
        x, _ = make_x("3d", 64, torch.float32)
        lora_mlp(x, g, u, d).backward(torch.randn((2, 3, 64), generator=torch.Generator().manual_seed(5)))
        for a, b in zip(grads[0], [t.grad for t in (x, g.A, g.B, u.A, u.B, d.A, d.B)]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)  # fp32 sums in another order



def test_adapter_gradient_in_its_own_dtype_on_cpu():
    from slothnb.kernels import lora as lora_mod

    a, b = torch.randn(32, 64, dtype=torch.bfloat16), torch.randn(64, 4, dtype=torch.bfloat16)
    assert torch.equal(lora_mod._mm_as(a, b, torch.float32), (a @ b).float())
    assert torch.equal(lora_mod._mm_as(a, b, torch.bfloat16), a @ b)


@pytest.mark.gpu
def test_adapter_gradient_comes_out_of_the_matmul_in_fp32_on_gpu():
    """On CUDA the fp32 gradient of a bf16 product is cuBLAS's fp32 accumulator (``out_dtype``): one
    launch, and closer to the exact product than the bf16-rounded one."""
    from slothnb.kernels import lora as lora_mod

    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(16, 4096, generator=gen, device="cuda").to(torch.bfloat16)
    b = torch.randn(4096, 4096, generator=gen, device="cuda").to(torch.bfloat16)
    exact = a.double() @ b.double()
    got = lora_mod._mm_as(a, b, torch.float32)
    assert lora_mod._MM_OUT_DTYPE and got.dtype == torch.float32
    rounded = (a @ b).float()
    assert (got.double() - exact).abs().max() < 0.5 * (rounded.double() - exact).abs().max()


def test_a_no_grad_forward_does_not_read_a_quantised_weights_flags():
    """A checkpointed layer's forward runs without grad: the frozen-weight check then skips the
    weight's ``requires_grad`` (through Python on a bitsandbytes Params4bit), and a cached NF4 weight
    is read once a call (its address)."""
    from test_nf4 import CountingParam

    p, _ = pair(32, 64, "nf4", torch.float32)
    p = LoraWeights(CountingParam(p.weight, requires_grad=False), p.quant_state, p.A, p.B, p.scale)
    x = torch.randn(4, 64)
    with torch.no_grad():
        first = lora_linear(x, p)
        CountingParam.reads = 0
        second = lora_linear(x, p)
    assert CountingParam.reads == 1 and torch.equal(first, second)
    with torch.enable_grad():  # with grad the flag is read (and an unfrozen weight refused)
        CountingParam.reads = 0
        lora_linear(x, p)
        assert CountingParam.reads == 2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "geglu_tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_activation_backward_rewrites_the_forward_h_bit_for_bit(activation, dtype, device):
    """A recompute without output leaves ``h A_d^T`` to the backward, computed from the h that
    ``gated_backward`` writes: it must be the forward kernel's h to the bit."""
    from slothnb.kernels.lora_activations import gated_backward, gated_forward

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator().manual_seed(0)
    g, u, dh = ((torch.randn(96, 700, generator=gen) * 3).to(dtype).to(device) for _ in range(3))
    h = gated_forward(activation, g, u)
    h_again, _, _ = gated_backward(activation, dh, g.clone(), u.clone())
    assert torch.equal(h, h_again)


def test_a_widened_buffer_filled_by_the_norm_gives_the_same_projections_without_a_copy(monkeypatch):
    """``widened_buffer`` + ``rms_norm_forward(out=)``: the RMSNorm writes X into the NF4 projections'
    ``[X | X A^T ..]`` buffer, so ``_widened_input`` copies nothing, and every output and saved value
    is the one the plain path computes."""
    import slothnb.kernels.lora as lora_mod
    from slothnb.kernels.lora_widened import widened_buffer
    from slothnb.kernels.rms_norm import rms_norm_forward

    class Ctx:
        def save_for_backward(self, *t):
            self.saved_tensors = t

    q, k, v = (pair(o, 64, "nf4", torch.float32, seed=s)[0] for o, s in ((64, 0), (32, 1), (32, 2)))
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    weight = torch.rand(64, generator=torch.Generator().manual_seed(4)) + 0.5
    tensors, bundles = lora_mod._adapters((q, k, v))
    runs = []
    for widened in (False, True):
        torch.set_grad_enabled(False)  # as inside a Function's forward
        buf = widened_buffer(x, (q, k, v)) if widened else None
        h, _ = rms_norm_forward(x.reshape(-1, 64), weight, 1e-6, 0.0,
                                out=None if buf is None else buf[:, :64])
        copies = []
        real_copy = torch.Tensor.copy_
        monkeypatch.setattr(torch.Tensor, "copy_", lambda t, *a, **kw: copies.append(t.shape) or real_copy(t, *a, **kw))
        ctx = Ctx()
        ctx.widened = buf
        outs = lora_mod.LoraQKVFunction.forward(ctx, h.view(2, 5, 64), bundles, *tensors)
        monkeypatch.setattr(torch.Tensor, "copy_", real_copy)
        torch.set_grad_enabled(True)
        runs.append((outs, ctx.saved_tensors, copies))
        if widened:
            assert buf.shape == (10, 64 + 3 * 8) and ctx.saved_tensors[0] is buf
    (outs_a, saved_a, copies_a), (outs_b, saved_b, copies_b) = runs
    assert (10, 64) in copies_a and (10, 64) not in copies_b  # X copied into the buffer only without it
    for a, b in zip((*outs_a, *saved_a), (*outs_b, *saved_b)):
        assert torch.equal(a, b)
    assert widened_buffer(x, (pair(64, 64)[0],)) is None  # a 16-bit base is never widened


class _StandInCtx:
    """An autograd ctx for calling a Function's forward and backward directly (as arch.llama_layer does)."""

    def __init__(self, keep):
        self.needs_input_grad = (True,) + (False,) * 4 + (True,) * 6
        self.keep_bases = keep

    def save_for_backward(self, *t):
        self.saved_tensors = t


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("part", ["qkv", "mlp", "qkv_fused"])
def test_a_recompute_keeps_its_dequantised_weights_for_the_backward(part, device, monkeypatch):
    """``ctx.keep_bases`` (a recompute whose backward follows at once, ``lora_widened.KEEP``): the
    backward reads W from the forward's widened buffers instead of dequantising q/k/v (or gate/up)
    again, and its gradients are the autograd path's bit for bit (both read W in the padded layout)."""
    import slothnb.kernels.lora as lora_mod
    import slothnb.kernels.lora_widened as widened_mod
    from slothnb.kernels.lora import LoraMLPFunction, LoraQKVFunction, _adapters

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(widened_mod, "FUSED_QKV", part == "qkv_fused")  # kept: the stacked [W_q; W_k; W_v]
    part = part.removesuffix("_fused")
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    shapes = ((64, 64), (32, 64), (32, 64)) if part == "qkv" else ((128, 64), (128, 64), (64, 128))
    ps = [pair(o, i, "nf4", dt, r=r, seed=s, device=device)[0] for s, ((o, i), r) in enumerate(zip(shapes, (8, 5, 16)))]
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3)).to(device, dt)
    out_f = [p.out_features for p in ps] if part == "qkv" else [64]
    dys = [torch.randn(2, 5, o, generator=torch.Generator().manual_seed(4 + j)).to(device, dt)
           for j, o in enumerate(out_f)]
    leaves = [x] + [t for p in ps for t in (p.A, p.B)]

    xr = x.clone().requires_grad_()
    outs = lora_qkv(xr, *ps) if part == "qkv" else [lora_mlp(xr, *ps)]
    ref = torch.autograd.grad(outs, [xr] + leaves[1:], dys)

    calls = []
    real = widened_mod.dequantize_nf4
    counting = lambda *a, **kw: calls.append(kw.get("tail") is not None) or real(*a, **kw)  # noqa: E731
    monkeypatch.setattr(widened_mod, "dequantize_nf4", counting)
    monkeypatch.setattr(lora_mod, "dequantize_nf4", counting)
    for keep in (True, False):
        tensors, bundles = _adapters(ps)
        ctx = _StandInCtx(keep)
        with torch.no_grad():
            if part == "qkv":
                LoraQKVFunction.forward(ctx, x, bundles, *tensors)
            else:
                LoraMLPFunction.forward(ctx, x, "swiglu", True, (None, None), bundles, *tensors)
            assert (ctx.kept is not None) == keep
            calls.clear()
            got = (LoraQKVFunction.backward(ctx, *dys) if part == "qkv" else LoraMLPFunction.backward(ctx, dys[0]))
        got = [g for g in got if isinstance(g, torch.Tensor)]
        # the backward's dequantisations: down's W for the MLP, and q/k/v or gate/up unless kept
        assert len(calls) == (0 if part == "qkv" else 1) + (0 if keep else (3 if part == "qkv" else 2))
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            assert torch.equal(a, b)
    monkeypatch.setattr(widened_mod, "KEEP", 0)  # off (as --ab-switch sets it): nothing kept
    ctx = _StandInCtx(True)
    tensors, bundles = _adapters(ps)
    with torch.no_grad():
        if part == "qkv":
            LoraQKVFunction.forward(ctx, x, bundles, *tensors)
        else:
            LoraMLPFunction.forward(ctx, x, "swiglu", True, (None, None), bundles, *tensors)
    assert ctx.kept is None
