"""dequantize_nf4 against bitsandbytes' own dequantize_4bit, bit for bit.

On CPU the kernel runs in Triton's interpreter. Weights whose rows are a whole number of
quantisation blocks (every real model) are compared with bitsandbytes' CPU dequantisation; for
rows that split a block, bitsandbytes' CPU C kernel decodes per row and disagrees with its own
quantiser, so those are checked against our PyTorch path and against the original weight.
"""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

from slothnb.errors import ConfigError  # noqa: E402
from slothnb.kernels.nf4 import dequantize_nf4, dequantize_nf4_reference  # noqa: E402

NF4_MAX_HALF_GAP = (1.0 - 0.6961928009986877) / 2  # widest gap of the NF4 table (-1 .. -0.696), halved


@pytest.fixture(autouse=True, params=[True, False], ids=["word-stores", "block-tiles"])
def _both_decoders(request, monkeypatch):
    """Every test runs with each of the kernel's two decoders (``nf4.WORD_STORES``): 32-bit words of
    codes, 8 outputs a thread, or tiles of whole quantisation blocks."""
    from slothnb.kernels import nf4

    monkeypatch.setattr(nf4, "WORD_STORES", request.param)


def quantized(shape, dtype=torch.bfloat16, nested=True, blocksize=64, device="cpu", seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=gen) * 0.05).to(dtype).to(device)
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=nested, blocksize=blocksize, **kw)
    return w, packed, state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nested", [True, False])
def test_matches_bitsandbytes_bit_for_bit(dtype, nested):
    _, packed, state = quantized((96, 128), dtype, nested)
    expected = bnbf.dequantize_4bit(packed, state)
    out = dequantize_nf4(packed, state)
    assert out.dtype == dtype and out.shape == (96, 128)
    assert torch.equal(out, expected)
    assert torch.equal(dequantize_nf4_reference(packed, state), expected)


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_blocksizes_and_nested_blocks(blocksize):
    # 40 x 512 / 32 = 640 absmax values: more than one nested block of 256, the last one partial
    _, packed, state = quantized((40, 512), torch.bfloat16, True, blocksize)
    assert torch.equal(dequantize_nf4(packed, state), bnbf.dequantize_4bit(packed, state))


def test_odd_element_count():
    _, packed, state = quantized((33, 65), torch.float16, True, 128)
    assert torch.equal(dequantize_nf4(packed, state), bnbf.dequantize_4bit(packed, state))


def test_rows_that_split_blocks_decode_the_flat_layout():
    w, packed, state = quantized((24, 160), torch.float32, True, 64)
    out = dequantize_nf4(packed, state)
    assert torch.equal(out, dequantize_nf4_reference(packed, state))
    blocks = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True)  # 24*160 is a multiple of 64
    err = (out - w).reshape(-1, 64).abs()
    # half the widest code gap, plus the 8-bit error of the double-quantised absmax (< 1%)
    assert (err <= blocks * (NF4_MAX_HALF_GAP + 0.01)).all()
    assert (err.amax(dim=1, keepdim=True) > blocks * 0.05).any()  # and it is a 4-bit code, not a copy


def test_other_output_dtypes_are_the_fp32_values_rounded():
    _, packed, state = quantized((64, 128), torch.bfloat16, True)
    fp32 = dequantize_nf4(packed, state, torch.float32)
    assert torch.equal(dequantize_nf4(packed, state, torch.float64), fp32.double())
    assert torch.equal(dequantize_nf4(packed, state, torch.float16), fp32.half())
    assert torch.equal(dequantize_nf4(packed, state, torch.bfloat16), fp32.bfloat16())  # round to nearest even


def test_accepts_params4bit_and_other_quant_storage():
    w = (torch.randn(64, 128) * 0.05).to(torch.bfloat16)
    param = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True).to("cpu")
    assert torch.equal(dequantize_nf4(param), bnbf.dequantize_4bit(param.data, param.quant_state))
    _, packed, state = quantized((64, 128), torch.bfloat16, True, quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    assert torch.equal(dequantize_nf4(packed, state), bnbf.dequantize_4bit(packed, state))


def test_bad_input_is_refused():
    w = torch.randn(64, 128)
    packed, fp4_state = bnbf.quantize_4bit(w, quant_type="fp4")
    with pytest.raises(ConfigError, match="nf4"):
        dequantize_nf4(packed, fp4_state)
    with pytest.raises(ConfigError, match="quant_state"):
        dequantize_nf4(packed)
    _, packed, state = quantized((64, 128))
    with pytest.raises(ConfigError, match="do not belong together"):
        dequantize_nf4(packed[: packed.shape[0] // 2], state)
    with pytest.raises(ConfigError, match="writes one of"):
        dequantize_nf4(packed, state, torch.int8)


def _into_wider_buffer(packed, state, left=16, right=5, device="cpu"):
    rows, cols = state.shape
    buf = torch.full((rows, left + cols + right), 7.0, dtype=state.dtype, device=device)
    out = dequantize_nf4(packed, state, out=buf[:, left:left + cols])
    return buf, out


@pytest.mark.parametrize("nested", [True, False])
def test_out_may_be_the_middle_columns_of_a_wider_buffer(nested):
    # what the fused LoRA ops do: W next to B in one [out, r + in] buffer, one matmul
    _, packed, state = quantized((48, 256), torch.bfloat16, nested)
    buf, out = _into_wider_buffer(packed, state)
    assert out.data_ptr() == buf[:, 16:].data_ptr()
    assert torch.equal(buf[:, 16:272], bnbf.dequantize_4bit(packed, state))
    assert (buf[:, :16] == 7).all() and (buf[:, 272:] == 7).all()  # nothing written outside


@pytest.mark.parametrize("nested", [True, False])
def test_paired_bf16_stores_give_the_same_bits(nested, monkeypatch):
    """The kernel's other store layout (two bf16 in one 32-bit word), which bench/sweep_nf4.py times."""
    from slothnb.kernels import nf4

    monkeypatch.setattr(nf4, "PAIRED_STORES", True)
    _, packed, state = quantized((48, 256), torch.bfloat16, nested)
    expected = bnbf.dequantize_4bit(packed, state)
    assert torch.equal(dequantize_nf4(packed, state), expected)
    buf, _ = _into_wider_buffer(packed, state)
    assert torch.equal(buf[:, 16:272], expected) and (buf[:, :16] == 7).all() and (buf[:, 272:] == 7).all()
    _, packed, state = quantized((33, 65), torch.bfloat16, True, 128)  # odd count: the 16-bit stores
    assert torch.equal(dequantize_nf4(packed, state), bnbf.dequantize_4bit(packed, state))


def test_bad_out_is_refused():
    _, packed, state = quantized((48, 256))
    with pytest.raises(ConfigError, match="out= must be"):
        dequantize_nf4(packed, state, out=torch.empty(48, 128, dtype=torch.bfloat16))
    with pytest.raises(ConfigError, match="out= must be"):
        dequantize_nf4(packed, state, torch.bfloat16, out=torch.empty(48, 256, dtype=torch.float16))
    _, packed, state = quantized((48, 96), blocksize=64)  # rows of one and a half blocks
    with pytest.raises(ConfigError, match="whole blocks"):
        dequantize_nf4(packed, state, out=torch.empty(48, 100, dtype=torch.bfloat16)[:, :96])


def _tail_case(dtype, zeros, r, scale, rows=48, cols=256, device="cpu", pad=8):
    """(buffer written by one dequantize_nf4(tail=...), the same written op by op) for an
    ``[rows, cols + zeros + r (+ pad)]`` buffer: what the fused LoRA ops build, ``[W | 0 | s B]``."""
    _, packed, state = quantized((rows, cols), dtype, True, device=device)
    T = (torch.randn(rows, r, generator=torch.Generator().manual_seed(1)) * 0.3).to(dtype).to(device)
    width = cols + zeros + r
    got, want = (torch.full((rows, width + pad), 7.0, dtype=dtype, device=device) for _ in range(2))
    dequantize_nf4(packed, state, out=got[:, :cols], tail=(T, scale, zeros))
    dequantize_nf4(packed, state, out=want[:, :cols])
    want[:, cols:cols + zeros].zero_()
    want[:, cols + zeros:width].copy_(T)
    if scale != 1.0:
        want[:, cols + zeros:width].mul_(scale)
    return got, want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("zeros,r,scale", [(0, 16, 1.0), (16, 16, 2.0), (32, 16, 0.7), (0, 8, 0.3)])
def test_tail_writes_zeros_then_the_scaled_adapter_beside_the_weight(dtype, zeros, r, scale):
    got, want = _tail_case(dtype, zeros, r, scale)
    assert torch.equal(got, want)  # the weight, the zeros, s * T rounded once, and the padding untouched


@pytest.mark.parametrize("zeros,scale", [(16, 0.7), (0, 1.0)])
def test_tail_on_the_pytorch_path_matches(zeros, scale, monkeypatch):
    from slothnb.kernels import nf4

    monkeypatch.setattr(nf4, "use_triton", lambda t: False)
    got, want = _tail_case(torch.bfloat16, zeros, 16, scale)
    assert torch.equal(got, want)


def test_a_tail_that_does_not_fit_is_refused():
    _, packed, state = quantized((48, 256))
    buf = torch.empty(48, 256 + 24, dtype=torch.bfloat16)
    T = torch.zeros(48, 16, dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="room for zeros"):  # 16 zeros + 16 columns > 24 spare
        dequantize_nf4(packed, state, out=buf[:, :256], tail=(T, 1.0, 16))
    with pytest.raises(ConfigError, match="tail="):
        dequantize_nf4(packed, state, out=buf[:, :256], tail=(T.float(), 1.0, 0))
    with pytest.raises(ConfigError, match="tail="):
        dequantize_nf4(packed, state, out=buf[:, :256], tail=(T[:40], 1.0, 0))
    with pytest.raises(ConfigError, match="needs out="):
        dequantize_nf4(packed, state, tail=(T, 1.0, 0))
    last = torch.empty(48 * 280 - 10, dtype=torch.bfloat16).as_strided((48, 256), (280, 1))  # storage ends early
    with pytest.raises(ConfigError, match="room for zeros"):
        dequantize_nf4(packed, state, out=last, tail=(T, 1.0, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("zeros,scale", [(0, 1.0), (32, 2.0), (16, 0.7)])
def test_gpu_tail_at_llama_8b_gate_shape(zeros, scale):
    got, want = _tail_case(torch.bfloat16, zeros, 16, scale, rows=14336, cols=4096, device="cuda")
    assert torch.equal(got, want)


@pytest.mark.gpu
# Every output dtype, both absmax layouts (each pair is its own Triton compilation).
@pytest.mark.parametrize("dtype,nested", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, True),
                                          (torch.float32, False)])
def test_gpu_matches_bitsandbytes_at_llama_8b_mlp_shape(dtype, nested):
    _, packed, state = quantized((14336, 4096), dtype, nested, device="cuda")
    expected = bnbf.dequantize_4bit(packed, state)
    out = dequantize_nf4(packed, state)
    assert out.is_cuda and torch.equal(out, expected)


@pytest.mark.gpu
def test_gpu_params4bit_from_linear4bit():
    layer = bnb.nn.Linear4bit(4096, 1024, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit((torch.randn(1024, 4096) * 0.02).to(torch.bfloat16), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
    layer = layer.cuda()
    expected = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(dequantize_nf4(layer.weight), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("paired", [False, True])
def test_gpu_out_into_a_wider_buffer_at_llama_8b_shape(paired, monkeypatch):
    from slothnb.kernels import nf4

    monkeypatch.setattr(nf4, "PAIRED_STORES", paired)
    _, packed, state = quantized((14336, 4096), torch.bfloat16, True, device="cuda")
    buf, _ = _into_wider_buffer(packed, state, device="cuda")
    assert torch.equal(buf[:, 16:16 + 4096], bnbf.dequantize_4bit(packed, state))
    assert (buf[:, :16] == 7).all() and (buf[:, 16 + 4096:] == 7).all()
    assert torch.equal(dequantize_nf4(packed, state), bnbf.dequantize_4bit(packed, state))


class CountingParam(torch.nn.Parameter):
    """A parameter that, like bitsandbytes' Params4bit, answers every read through Python."""
    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.reads += 1
        return torch._C._disabled_torch_function_impl(func, types, args, kwargs or {})


def test_a_cached_weight_is_read_once_a_call():
    """A Params4bit's attribute reads run Python (~1.5 us each): a cached weight costs one (its address)."""
    _, packed, state = quantized((32, 128), torch.bfloat16, True)
    weight = CountingParam(packed, requires_grad=False)
    expected = dequantize_nf4(packed, state)
    assert torch.equal(dequantize_nf4(weight, state), expected)
    CountingParam.reads = 0
    got = dequantize_nf4(weight, state)
    assert CountingParam.reads == 1 and torch.equal(got, expected)


def test_a_weight_is_checked_and_decoded_once_then_served_from_the_cache(monkeypatch):
    from slothnb.kernels import nf4

    if not nf4.use_triton(torch.empty(0)):
        pytest.skip("the cache serves the Triton path (TRITON_INTERPRET=1 on CPU)")
    _, packed, state = quantized((32, 128), torch.bfloat16, True)
    resolved = []
    real = nf4._resolve
    monkeypatch.setattr(nf4, "_resolve", lambda *a: resolved.append(1) or real(*a))
    first = dequantize_nf4(packed, state)
    second = dequantize_nf4(packed, state)
    assert len(resolved) == 1 and torch.equal(first, second)
    # another tensor (here: the same codes, another storage) is decoded afresh, and right
    other = packed.clone()
    assert torch.equal(dequantize_nf4(other, state), first) and len(resolved) == 2
    # a different quant_state for the same tensor is not served the cached one
    _, _, state2 = quantized((32, 128), torch.bfloat16, False)
    dequantize_nf4(packed, state2)
    assert len(resolved) == 3
    del other  # a dead weight leaves the cache
    assert all(ref() is not None for ref, *_ in nf4._DECODED.values())


class BindingKernel:
    """Stands in for ``_dequantize_nf4_kernel`` where launches cannot be bound (the interpreter): each
    bound launch re-runs the real kernel with the new values at its slots, and is counted."""

    def __init__(self, real):
        self.real, self.binds, self.replays = real, 0, 0

    def __getitem__(self, grid):
        return self.real[grid]

    def bind(self, grid, args, kwargs, slots):
        self.real[grid](*args, **kwargs)
        self.binds += 1

        def bound(*values):
            params = list(args)
            for i, v in zip(slots, values):
                params[i] = v
            self.real[grid](*params, **kwargs)
            self.replays += 1
            return True
        return bound


@pytest.fixture
def binding(monkeypatch):
    from slothnb.kernels import nf4

    if not nf4.use_triton(torch.empty(0)):
        pytest.skip("launches are bound on the Triton path (TRITON_INTERPRET=1 on CPU)")
    kernel = BindingKernel(nf4._dequantize_nf4_kernel)
    monkeypatch.setattr(nf4, "_dequantize_nf4_kernel", kernel)
    monkeypatch.setattr(nf4, "BIND", True)
    return nf4, kernel


def test_a_weights_launch_is_bound_by_geometry_and_replayed_into_fresh_buffers(binding):
    nf4, kernel = binding
    _, packed, state = quantized((48, 256), torch.bfloat16, True, device="cpu", seed=3)
    T = torch.randn(48, 16).to(torch.bfloat16)
    want = bnbf.dequantize_4bit(packed, state)

    def widened(scale):
        buf = torch.full((48, 256 + 40), 7.0, dtype=torch.bfloat16)
        nf4.dequantize_nf4(packed, state, torch.bfloat16, out=buf[:, :256], tail=(T, scale, 16))
        return buf

    first, second = widened(0.5), widened(0.5)
    assert (kernel.binds, kernel.replays) == (1, 1)
    assert torch.equal(first, second) and torch.equal(second[:, :256], want)
    assert (second[:, 256:272] == 0).all() and torch.equal(second[:, 272:288], (T.float() * 0.5).to(torch.bfloat16))
    assert (second[:, 288:] == 7).all()
    widened(2.0)  # another scale is another launch
    assert (kernel.binds, kernel.replays) == (2, 1)
    for _ in range(2):  # the plain form: its own geometry, out allocated as before
        assert torch.equal(nf4.dequantize_nf4(packed, state), want)
    assert (kernel.binds, kernel.replays) == (3, 2)
    into = torch.empty(48, 264, dtype=torch.bfloat16)[:, :256]  # strided: another geometry again
    nf4.dequantize_nf4(packed, state, out=into)
    assert torch.equal(into, want) and (kernel.binds, kernel.replays) == (4, 2)


def test_bound_launches_still_check_their_arguments_and_can_be_switched_off(binding, monkeypatch):
    nf4, kernel = binding
    _, packed, state = quantized((48, 256), torch.bfloat16, True, device="cpu", seed=4)
    T = torch.zeros(48, 16, dtype=torch.bfloat16)
    buf = torch.empty(48, 256 + 24, dtype=torch.bfloat16)
    nf4.dequantize_nf4(packed, state, out=buf[:, :256], tail=(T, 1.0, 0))
    with pytest.raises(ConfigError, match="room for zeros"):  # 16 zeros + 16 columns > 24: not the bound geometry
        nf4.dequantize_nf4(packed, state, out=buf[:, :256], tail=(T, 1.0, 16))
    with pytest.raises(ConfigError, match="tail="):
        nf4.dequantize_nf4(packed, state, out=buf[:, :256], tail=(T.float(), 1.0, 0))
    monkeypatch.setattr(nf4, "BIND", False)
    nf4.dequantize_nf4(packed, state, out=buf[:, :256], tail=(T, 1.0, 0))
    assert (kernel.binds, kernel.replays) == (1, 0)


@pytest.mark.gpu
def test_gpu_bound_launches_give_the_same_bits(monkeypatch):
    from slothnb.kernels import nf4

    _, packed, state = quantized((14336, 4096), torch.bfloat16, True, device="cuda", seed=5)
    T = torch.randn(14336, 16, device="cuda").to(torch.bfloat16)

    def run():
        buf = torch.full((14336, 4096 + 48), 7.0, dtype=torch.bfloat16, device="cuda")
        nf4.dequantize_nf4(packed, state, torch.bfloat16, out=buf[:, :4096], tail=(T, 0.5, 16))
        return buf, nf4.dequantize_nf4(packed, state)

    monkeypatch.setattr(nf4, "BIND", False)
    expected = run()
    monkeypatch.setattr(nf4, "BIND", True)
    run()  # binds
    assert len(nf4._decoded(packed, state).plans) == 2
    got = run()  # replayed
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
