"""token_chunked: the MLP over token chunks gives the unchunked outputs and gradients, holding one chunk.

17 tokens in chunks of 5 (a ragged last chunk), float64, against the same op run unchunked.
"""
import pytest
import torch
import torch.nn.functional as F

bnbf = pytest.importorskip("bitsandbytes.functional")

from slothnb.errors import ConfigError  # noqa: E402
from slothnb.kernels.lora import LoraWeights, lora_mlp  # noqa: E402
from slothnb.kernels.lora_chunked import token_chunked  # noqa: E402


def weights(out_f, in_f, base, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * in_f ** -0.5
    A = (torch.randn(4, in_f, generator=gen) * in_f ** -0.5).double().requires_grad_()
    B = (torch.randn(out_f, 4, generator=gen) * 0.2).double().requires_grad_()
    if base == "nf4":
        weight, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
        return LoraWeights(weight, state, A, B, 2.0)
    return LoraWeights(w.double(), None, A, B, 2.0)


def twin(p):
    return LoraWeights(p.weight, p.quant_state, p.A.detach().clone().requires_grad_(),
                       p.B.detach().clone().requires_grad_(), p.scale)


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
@pytest.mark.parametrize("base", ["16bit", "nf4"])
def test_chunked_lora_mlp_matches_unchunked(activation, base):
    g, u, d = weights(48, 32, base, 0), weights(48, 32, base, 1), weights(32, 48, base, 2)
    g2, u2, d2 = twin(g), twin(u), twin(d)
    x = torch.randn(1, 17, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    rows = []

    def fn(xc):
        rows.append(xc.shape[0])
        return lora_mlp(xc, g, u, d, activation=activation)

    y = token_chunked(fn, x, [g.A, g.B, u.A, u.B, d.A, d.B], chunk=5)
    assert type(y.grad_fn).__name__ == "TokenChunkedFunctionBackward" and y.shape == (1, 17, 32)
    want = lora_mlp(x2, g2, u2, d2, activation=activation)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(4))
    y.backward(dy)
    want.backward(dy)
    assert rows == [5, 5, 5, 2] * 2  # forward, then one recompute per chunk in backward
    for ours, ref in [(x, x2), *((getattr(a, n), getattr(b, n)) for a, b in ((g, g2), (u, u2), (d, d2))
                                 for n in ("A", "B"))]:
        torch.testing.assert_close(ours.grad, ref.grad, rtol=0, atol=1e-12)


def test_forward_saves_only_the_input():
    """Between the passes the node holds x and nothing of the chunks' intermediates."""
    W1 = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    W2 = torch.randn(8, 64, dtype=torch.float64, requires_grad=True)
    x = torch.randn(17, 8, dtype=torch.float64, requires_grad=True)
    saved = []

    def keep(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = token_chunked(lambda xc: F.silu(xc @ W1.t()) @ W2.t(), x, [W1, W2], chunk=5)
    assert saved == [(17, 8)]
    (g_x, g_w1, g_w2) = torch.autograd.grad(y.square().sum(), [x, W1, W2])  # autograd.grad works too
    ref = F.silu(x @ W1.t()) @ W2.t()
    want = torch.autograd.grad(ref.square().sum(), [x, W1, W2])
    for ours, ref_g in zip((g_x, g_w1, g_w2), want):
        torch.testing.assert_close(ours, ref_g, rtol=1e-12, atol=1e-12)


def test_frozen_input_no_grad_and_short_inputs():
    W = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 9, 8, dtype=torch.float64)  # no grad: the adapters still train
    y = token_chunked(lambda xc: torch.tanh(xc @ W.t()), x, [W], chunk=4)
    y.sum().backward()
    W2 = W.detach().clone().requires_grad_()
    torch.tanh(x @ W2.t()).sum().backward()
    torch.testing.assert_close(W.grad, W2.grad, rtol=0, atol=1e-12)
    with torch.no_grad():  # inference: the same numbers, no graph
        z = token_chunked(lambda xc: torch.tanh(xc @ W.t()), x, [W], chunk=4)
    assert z.grad_fn is None and torch.equal(z, y.detach())
    short = token_chunked(lambda xc: xc * 2, x, [W], chunk=18)  # at or under the chunk: plain call
    assert short.grad_fn is None and torch.equal(short, x * 2)
    with pytest.raises(ConfigError, match="SLOTHNB_MLP_CHUNK_TOKENS"):
        token_chunked(lambda xc: xc, x, [W], chunk=0)
