"""Soft-capped flash attention vs a float64 reference (Triton interpreter on CPU): forward, dq, dk,
dv; causal with and without a sliding window, GQA and MHA, D=64 and 256, lengths that are not a
multiple of the tiles (the interpreter runs 16 x 16 tiles, so S=40 spans three key blocks).

Tolerances: fp32 kernels vs float64, 2e-5 abs (errors seen ~1e-6). The GPU test compares bf16
against the eager path in fp32 and checks the peak memory.
"""
import math

import pytest
import torch

from slothnb.errors import ConfigError
from slothnb.kernels import use_triton
from slothnb.kernels.softcap_attention import (SoftcapAttentionFunction, softcap_attention,
                                               softcap_attention_reference)


def make(B, H, Hk, S, D, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    # q*k / sqrt(D) ~ N(0, 4): the cap (softcap 5 for D=64) bends most scores, so a missing or
    # wrong tanh derivative shows up
    q = torch.randn(B, H, S, D, generator=g, device=device) * 2
    k = torch.randn(B, Hk, S, D, generator=g, device=device) * 2
    v = torch.randn(B, Hk, S, D, generator=g, device=device)
    do = torch.randn(B, H, S, D, generator=g, device=device)
    return [t.to(dtype) for t in (q, k, v, do)]


def run(fn, q, k, v, do, *args, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, *args, **kw)
    out.backward(do.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def check(q, k, v, do, softcap, causal=True, window=None, blocks=None, atol=2e-5):
    scale = q.shape[-1] ** -0.5
    if blocks is None:
        got = run(softcap_attention, q, k, v, do, softcap, scale, causal, window)
    else:
        got = run(SoftcapAttentionFunction.apply, q, k, v, do, softcap, scale, causal, window, blocks)
    want = run(softcap_attention_reference, q.double(), k.double(), v.double(), do, softcap, scale, causal, window)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == q.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    return got


def test_kernels_run_under_triton_here():
    assert use_triton(torch.empty(1, device="cuda" if torch.cuda.is_available() else "cpu"))


@pytest.mark.parametrize("heads", [(4, 2), (2, 2)])
@pytest.mark.parametrize("S", [17, 40])
@pytest.mark.parametrize("window", [None, 7])
def test_d64_matches_float64(heads, S, window, device):
    q, k, v, do = make(1, *heads, S, 64, device, seed=S)
    check(q, k, v, do, softcap=5.0, window=window)


@pytest.mark.parametrize("S,window", [(40, None), (40, 5), (17, 30)])
def test_d256_gqa_matches_float64(S, window, device):
    # Gemma-2's head dim; softcap 50 as in its config (window 30 > S: no key is cut)
    q, k, v, do = make(1, 4, 2, S, 256, device, seed=1)
    check(q, k, v, do, softcap=50.0, window=window, atol=4e-5)


@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)])
@pytest.mark.parametrize("window", [None, 1, 2, 18])
def test_unequal_tiles_and_window_edges(blocks, window, device):
    # BLOCK_M != BLOCK_N moves the skipped-block bounds off the diagonal; window 1 = only j == i;
    # windows 2 and 18 (= 2 mod 16) put a row's first visible key first in a tile, where an
    # off-by-one in the visited block ranges drops a whole tile
    q, k, v, do = make(2, 4, 2, 40, 64, device, seed=3)
    check(q, k, v, do, softcap=5.0, window=window, blocks=blocks)


def test_not_causal_mha(device):
    q, k, v, do = make(2, 2, 2, 17, 64, device, seed=4)
    check(q, k, v, do, softcap=5.0, causal=False)


def test_cap_changes_the_result(device):
    # The same scores without the cap are far off: the test inputs really exercise the tanh.
    q, k, v, do = make(1, 2, 2, 40, 64, device, seed=5)
    out = check(q, k, v, do, softcap=5.0)[0]
    uncapped = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (out - uncapped).abs().max() > 0.1


def test_head_major_strided_inputs(device):
    # q, k, v as slothnb builds them: [B, S, H, D] memory seen as [B, H, S, D]; out likewise
    q, k, v, do = make(1, 4, 2, 40, 64, device, seed=6)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    out = check(q, k, v, do, softcap=5.0, window=9)[0]
    assert out.transpose(1, 2).is_contiguous()  # the caller's transpose + reshape is free


def test_bf16_close_to_float64(device):
    q, k, v, do = make(1, 4, 2, 40, 64, device, dtype=torch.bfloat16, seed=7)
    got = run(softcap_attention, q, k, v, do, 5.0, 0.125, True, 7)
    want = run(softcap_attention_reference, q.double(), k.double(), v.double(), do, 5.0, 0.125, True, 7)
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        assert (a.double() - b).norm() / b.norm() < 1e-2


def test_reference_mirrors_eager_path_and_transformers_window(monkeypatch):
    from types import SimpleNamespace

    from slothnb.models.arch import common
    from slothnb.models.arch.common import _softcapped_attention

    monkeypatch.setattr(common, "SOFTCAP_FLASH", False)  # the reference is the eager path itself

    q, k, v, _ = make(2, 4, 2, 17, 64, seed=8)
    attn = SimpleNamespace(num_key_value_groups=2, scaling=0.125, is_causal=True, training=False)
    eager = _softcapped_attention(attn, q, k, v, None, 5.0, 0.0)
    torch.testing.assert_close(softcap_attention_reference(q, k, v, 5.0, 0.125), eager, atol=1e-6, rtol=1e-6)
    # sliding window as transformers' Gemma-2 mask: causal and kv_idx > q_idx - window
    masking = pytest.importorskip("transformers.masking_utils")
    i, j = torch.arange(17)[:, None], torch.arange(17)[None, :]
    mask = masking.sliding_window_overlay(5)(0, 0, i, j) & masking.causal_mask_function(0, 0, i, j)
    eager = _softcapped_attention(attn, q, k, v, mask, 5.0, 0.0)
    torch.testing.assert_close(softcap_attention_reference(q, k, v, 5.0, 0.125, window=5), eager,
                               atol=1e-6, rtol=1e-6)


def test_rejects_what_it_cannot_do():
    q, k, v, _ = make(1, 3, 2, 8, 64)
    with pytest.raises(ConfigError):
        softcap_attention(q, k, v, 5.0, 0.125)  # 3 query heads over 2 kv heads
    q, k, v, _ = make(1, 2, 2, 8, 64)
    with pytest.raises(ConfigError):
        softcap_attention(q, k, v, 5.0, 0.125, causal=False, window=4)
    with pytest.raises(ConfigError):
        softcap_attention(q, k[:, :, :4], v[:, :, :4], 5.0, 0.125)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 512])
def test_gpu_gemma2_9b_shape_vs_eager(window, monkeypatch):
    """Gemma-2-9B attention (16 query / 8 kv heads, D 256, softcap 50, scale 256^-0.5) at 2 x 2048
    tokens in bf16: within 2x the eager bf16 path's own error against eager fp32, at a fraction of
    its memory."""
    from types import SimpleNamespace

    from slothnb.models.arch import common
    from slothnb.models.arch.common import _softcapped_attention

    monkeypatch.setattr(common, "SOFTCAP_FLASH", False)  # the reference is the eager path itself
    B, H, Hk, S, D, cap, scale = 2, 16, 8, 2048, 256, 50.0, 256 ** -0.5
    q, k, v, do = make(B, H, Hk, S, D, device="cuda", seed=0)
    q = q * 0.75  # scores ~ N(0, 9), tails to ~15: bent by the cap of 50, not saturated
    attn = SimpleNamespace(num_key_value_groups=H // Hk, scaling=scale, is_causal=True, training=False)
    mask = None
    if window is not None:
        i = torch.arange(S, device="cuda")[:, None]
        j = torch.arange(S, device="cuda")[None, :]
        mask = (j <= i) & (i - j < window)

    def eager(q_, k_, v_):
        return _softcapped_attention(attn, q_, k_, v_, mask, cap, 0.0)

    def peak(fn, *ts):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res = run(fn, *ts)
        torch.cuda.synchronize()
        return res, torch.cuda.max_memory_allocated() - base

    want = run(eager, q, k, v, do)
    bf = [t.bfloat16() for t in (q, k, v, do)]
    eager_bf16, eager_peak = peak(eager, *bf)
    got, kernel_peak = peak(lambda a, b, c: softcap_attention(a, b, c, cap, scale, True, window), *bf)
    for name, a, e, w in zip(("out", "dq", "dk", "dv"), got, eager_bf16, want):
        assert a.dtype == torch.bfloat16
        err = ((a.float() - w).norm() / w.norm()).item()
        err_eager = ((e.float() - w).norm() / w.norm()).item()
        assert err < 2e-2 and err <= 2 * err_eager + 1e-3, (name, err, err_eager)
    # eager holds [B, H, S, S] scores in bf16 and fp32 (~1.3 GB here); the kernel only O(S) more
    assert kernel_peak < eager_peak / 4, (kernel_peak, eager_peak)
    assert math.isfinite(kernel_peak)
