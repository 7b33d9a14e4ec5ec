"""RoPE kernel vs HF's apply_rotary_pos_emb formula in float64: forward (in place), backward,
the cache-gather variant with restarting (packed) positions, strided views, every head_dim.

Tolerances: fp32 (CPU interpreter) 1e-5 abs / 1e-5 rel; bf16 2e-2/1e-2 and fp16 2e-3/2e-3 on GPU
(the kernel rounds once, from fp32, to the storage dtype).
"""
import pytest
import torch

import slothnb.kernels.rope as rope_mod
from slothnb.errors import ConfigError
from slothnb.kernels.rope import apply_rope, apply_rope_from_cache, apply_rope_reference

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


def hf_tables(max_pos, dim, base=10000.0, device="cpu"):
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def _qk(B, Hq, Hk, S, D, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Made as [B, S, H, D] and transposed, like HF attention: non-contiguous [B, H, S, D] views.
    q = torch.randn(B, S, Hq, D, generator=g, dtype=torch.float64).to(device)
    k = torch.randn(B, S, Hk, D, generator=g, dtype=torch.float64).to(device)
    return q, k


def _run_and_compare(q64, k64, cos, sin, dtype=torch.float32, position_ids=None):
    """q64/k64 [B, S, H, D] float64 masters; cos/sin [Bc, S, D] or caches when position_ids is given."""
    ql, kl = q64.to(dtype).requires_grad_(), k64.to(dtype).requires_grad_()
    q, k = (ql * 1).transpose(1, 2), (kl * 1).transpose(1, 2)  # non-leaf, strided views
    cos_d, sin_d = cos.to(dtype), sin.to(dtype)
    if position_ids is None:
        qo, ko = apply_rope(q, k, cos_d, sin_d)
        cos_g, sin_g = cos_d.double(), sin_d.double()
    else:
        qo, ko = apply_rope_from_cache(q, k, cos_d, sin_d, position_ids)
        cos_g, sin_g = cos_d.double()[position_ids], sin_d.double()[position_ids]
    assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()  # rotated in place
    torch.testing.assert_close(qo, q, atol=0, rtol=0)
    rq, rk = ql.detach().double().requires_grad_(), kl.detach().double().requires_grad_()
    ref_q, ref_k = apply_rope_reference(rq.transpose(1, 2), rk.transpose(1, 2), cos_g, sin_g)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(qo.double(), ref_q, atol=atol, rtol=rtol)
    torch.testing.assert_close(ko.double(), ref_k, atol=atol, rtol=rtol)
    g = torch.Generator().manual_seed(3)
    gq = torch.randn(ref_q.shape, generator=g, dtype=torch.float64).to(qo.device)
    gk = torch.randn(ref_k.shape, generator=g, dtype=torch.float64).to(qo.device)
    torch.autograd.backward([qo, ko], [gq.to(dtype), gk.to(dtype)])
    torch.autograd.backward([ref_q, ref_k], [gq.to(dtype).double(), gk.to(dtype).double()])
    torch.testing.assert_close(ql.grad.double(), rq.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(kl.grad.double(), rk.grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_rope_matches_hf_every_head_dim(head_dim, device):
    q, k = _qk(2, 4, 2, 3, head_dim, device)
    cos, sin = hf_tables(3, head_dim, device=device)
    _run_and_compare(q, k, cos[None], sin[None])


def test_rope_per_batch_tables_and_general_cos_sin(device):
    q, k = _qk(2, 3, 1, 4, 64, device, seed=1)
    g = torch.Generator().manual_seed(9)
    # Halves deliberately unequal: checks the exact vector-Jacobian product, not just "rotate by -sin".
    cos = torch.randn(2, 4, 64, generator=g, dtype=torch.float64).to(device)
    sin = torch.randn(2, 4, 64, generator=g, dtype=torch.float64).to(device)
    _run_and_compare(q, k, cos, sin)


def test_rope_one_token(device):
    q, k = _qk(1, 2, 1, 1, 128, device, seed=2)
    cos, sin = hf_tables(9, 128, device=device)
    _run_and_compare(q, k, cos[None, 8:9], sin[None, 8:9])


@pytest.mark.parametrize("batch_pos", [1, 2])
def test_rope_from_cache_packed_positions(batch_pos, device):
    q, k = _qk(2, 4, 2, 5, 96, device, seed=4)
    cos, sin = hf_tables(16, 96, device=device)
    pos = torch.tensor([[0, 1, 2, 0, 1], [7, 8, 0, 1, 2]], device=device)[:batch_pos]
    _run_and_compare(q, k, cos, sin, position_ids=pos)


def test_rope_strided_last_dim_is_still_in_place(device):
    q_big = torch.randn(1, 2, 3, 128, dtype=torch.float32, device=device)
    k_big = torch.randn(1, 1, 3, 128, dtype=torch.float32, device=device)
    q, k = q_big[..., ::2], k_big[..., ::2]  # head_dim 64 with stride 2
    cos, sin = hf_tables(3, 64, device=device)
    want_q, want_k = apply_rope_reference(q.double(), k.double(), cos[None], sin[None])
    with torch.no_grad():
        qo, ko = apply_rope(q, k, cos[None].float(), sin[None].float())
    torch.testing.assert_close(q_big[..., ::2].double(), want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_big[..., ::2].double(), want_k, atol=1e-5, rtol=1e-5)
    assert qo is q and ko is k


def test_rope_pytorch_fallback_is_the_same_op(monkeypatch, device):
    q, k = _qk(2, 2, 1, 3, 80, device, seed=5)
    cos, sin = hf_tables(8, 80, device=device)
    pos = torch.tensor([[5, 6, 7], [0, 1, 2]], device=device)
    monkeypatch.setattr(rope_mod, "use_triton", lambda t: False)
    _run_and_compare(q, k, cos[None, :3], sin[None, :3])
    _run_and_compare(q, k, cos, sin, position_ids=pos)


def test_rope_bad_inputs_raise(device):
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    cos, sin = hf_tables(4, 8)
    with pytest.raises(ConfigError, match="cos/sin"):
        apply_rope(q, k, cos[None, :2].float(), sin[None, :2].float())
    with pytest.raises(ConfigError, match="odd"):
        apply_rope(torch.randn(1, 2, 3, 7), torch.randn(1, 1, 3, 7), cos[:3, :7], sin[:3, :7])
    with pytest.raises(ConfigError, match="cache has 4 rows"):
        apply_rope_from_cache(q, k, cos.float(), sin.float(), torch.tensor([[0, 1, 4]]))
    with pytest.raises(ConfigError, match="same tensor"):
        apply_rope(q, q, cos[None, :3].float(), sin[None, :3].float())


@pytest.mark.gpu
# Each (dtype, head_dim) is four Triton compilations (table/gather x forward/backward): every head_dim
# once, power-of-two and padded ones in both dtypes.
@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 80), (torch.bfloat16, 128), (torch.bfloat16, 256),
                                            (torch.float16, 64), (torch.float16, 96)])
def test_rope_gpu(dtype, head_dim):
    S = 2048 if head_dim == 128 else 256
    q, k = _qk(2, 32, 8, S, head_dim, "cuda", seed=6)
    cos, sin = hf_tables(4096, head_dim, device="cuda")
    _run_and_compare(q, k, cos[None, :S], sin[None, :S], dtype=dtype)
    pos = torch.cat([torch.arange(S // 2), torch.arange(S - S // 2) + 100]).cuda()[None].repeat(2, 1)
    _run_and_compare(q, k, cos, sin, dtype=dtype, position_ids=pos)


def test_rope_matches_transformers_apply_rotary_pos_emb_fp32(device):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = _qk(2, 4, 2, 6, 128, device, seed=7)
    q, k = q.float().transpose(1, 2).contiguous(), k.float().transpose(1, 2).contiguous()
    cos, sin = hf_tables(6, 128, device=device)
    cos, sin = cos[None].float(), sin[None].float()
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    with torch.no_grad():
        got_q, got_k = apply_rope(q.clone(), k.clone(), cos, sin)
    torch.testing.assert_close(got_q, want_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_k, want_k, atol=1e-6, rtol=1e-6)


def test_rope_refuses_to_corrupt_a_saved_input(device):
    ql = torch.randn(1, 3, 2, 64, device=device, requires_grad=True)
    q, k = (ql * 1).transpose(1, 2), torch.randn(1, 1, 3, 64, device=device)
    saved = q * q  # mul saves q for its backward
    cos, sin = hf_tables(3, 64, device=device)
    qo, _ = apply_rope(q, k, cos[None].float(), sin[None].float())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (saved.sum() + qo.sum()).backward()


def test_projections_rotated_in_place_with_autograd():
    """apply_rope_projections on [B, S, H*D] projection outputs: same storage (no copy), HF's numbers
    forward and backward, and views are refused (autograd would forbid the in-place rotation)."""
    B, S, Hq, Hk, D = 2, 5, 4, 2, 8
    g = torch.Generator().manual_seed(0)
    base_q = torch.randn(B, S, Hq * D, generator=g, requires_grad=True)
    base_k = torch.randn(B, S, Hk * D, generator=g, requires_grad=True)
    cos, sin = (t[:S].float().unsqueeze(0) for t in hf_tables(S, D))
    q, k = base_q * 1.0, base_k * 1.0  # non-leaf, non-view, like projection outputs
    ptrs = (q.data_ptr(), k.data_ptr())
    rq, rk = rope_mod.apply_rope_projections(q, k, cos, sin, D)
    assert (rq.data_ptr(), rk.data_ptr()) == ptrs and rq is q
    heads = lambda t, h: t.view(B, S, h, D).transpose(1, 2)
    want_q, want_k = apply_rope_reference(heads(base_q, Hq), heads(base_k, Hk), cos, sin)
    torch.testing.assert_close(heads(rq, Hq), want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(heads(rk, Hk), want_k, atol=1e-5, rtol=1e-5)
    gq, gk = torch.randn_like(want_q), torch.randn_like(want_k)
    (heads(rq, Hq) * gq).sum().add((heads(rk, Hk) * gk).sum()).backward()
    ref_q, ref_k = base_q.detach().clone().requires_grad_(), base_k.detach().clone().requires_grad_()
    wq, wk = apply_rope_reference(heads(ref_q, Hq), heads(ref_k, Hk), cos, sin)
    ((wq * gq).sum() + (wk * gk).sum()).backward()
    torch.testing.assert_close(base_q.grad, ref_q.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base_k.grad, ref_k.grad, atol=1e-5, rtol=1e-5)
    assert not rope_mod.rope_in_place_ok(q.view(B, S, Hq, D), k)
    with pytest.raises(ConfigError, match="non-view"):
        rope_mod.apply_rope_projections(q[:, :, :D], k, cos, sin, D)



class _ColumnBlocks(torch.autograd.Function):
    """Stands in for ``LoraQKVFunction`` with ``FUSED_QKV``: its outputs are column blocks of one buffer."""

    @staticmethod
    def forward(ctx, y, shapes):
        from slothnb.kernels.lora_widened import _column_blocks

        return tuple(_column_blocks(y.clone(), shapes))

    @staticmethod
    def backward(ctx, *grads):
        return torch.cat([g.reshape(-1, g.shape[-1]) for g in grads], dim=1), None


def test_column_blocks_of_one_output_are_rotated_in_place_with_autograd():
    """q and k as column blocks of one q/k/v output (``lora_widened.FUSED_QKV``): rows spaced wider than
    their features, not views; rotated where they lie, with HF's numbers forward and backward."""
    B, S, Hq, Hk, D = 2, 5, 4, 2, 8
    g = torch.Generator().manual_seed(0)
    base = torch.randn(B * S, (Hq + 2 * Hk) * D, generator=g, dtype=torch.float64, requires_grad=True)
    shapes = [(B, S, Hq * D), (B, S, Hk * D), (B, S, Hk * D)]
    q, k, v = _ColumnBlocks.apply(base, shapes)
    assert not q.is_contiguous() and q._base is None and rope_mod.rope_in_place_ok(q, k)
    assert not rope_mod.rope_in_place_ok(q[1:], k)  # a view
    cos, sin = (t[:S].double().unsqueeze(0) for t in hf_tables(S, D))
    ptrs = (q.data_ptr(), k.data_ptr())
    rq, rk = rope_mod.apply_rope_projections(q, k, cos, sin, D)
    assert (rq.data_ptr(), rk.data_ptr()) == ptrs  # rotated where they lie

    ref = base.detach().clone().requires_grad_()
    rows = ref.view(B, S, -1)
    heads = lambda t, h: t.reshape(B, S, h, D).transpose(1, 2)
    want_q, want_k = apply_rope_reference(heads(rows[..., :Hq * D], Hq), heads(rows[..., Hq * D:(Hq + Hk) * D], Hk),
                                          cos, sin)
    torch.testing.assert_close(heads(rq, Hq), want_q)
    torch.testing.assert_close(heads(rk, Hk), want_k)
    gq, gk, gv = (torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (want_q, want_k, v))
    ((heads(rq, Hq) * gq).sum() + (heads(rk, Hk) * gk).sum() + (v * gv).sum()).backward()
    ((want_q * gq).sum() + (want_k * gk).sum() + (rows[..., (Hq + Hk) * D:] * gv).sum()).backward()
    torch.testing.assert_close(base.grad, ref.grad)
