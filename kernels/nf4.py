"""Dequantise bitsandbytes 4-bit NF4 weights (double-quantised absmax included) in one launch.

Layout, as bitsandbytes 0.4x-0.50 stores it (``bitsandbytes.functional.quantize_4bit``):

- ``packed``: the row-major flattened weight, two 4-bit codes per byte, the element with the even
  flat index in the HIGH nibble (``out[0::2] = byte >> 4``, ``out[1::2] = byte & 0xF``). The storage
  dtype may be anything (``quant_storage``); it is reinterpreted as uint8.
- ``quant_state.code``: the 16-entry NF4 table (fp32); ``quant_state.blocksize`` flat elements share
  one scale ``absmax[i // blocksize]``; value = ``code[nibble] * absmax`` in fp32, then cast.
- double quantisation (``quant_state.nested``): ``absmax`` is itself uint8 codes of
  ``absmax - offset`` quantised blockwise (``state2.blocksize``, 256) with the 8-bit dynamic table
  ``state2.code`` and fp32 scales ``state2.absmax``, so
  ``absmax[b] = state2.code[q[b]] * state2.absmax[b // 256] + offset`` (two fp32 roundings: the
  multiply, then the add; the kernel disables FMA contraction to match bitsandbytes bit for bit).

The Triton kernel reads each byte once per output pair and decodes both absmax levels in
registers, so nothing but the output is written. ``dequantize_nf4`` is what the fused LoRA ops call
in forward AND backward (the dequantised copy is never kept between them).
"""
import os
import weakref
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._utils import cdiv, fast_launch, next_power_of_2, round_fp32_for_bf16, use_triton
from ..errors import ConfigError

OUTPUTS_PER_PROGRAM = 2048  # whole quantisation blocks per program (bench/sweep_nf4.py chose it)
# Each program thread decodes one 32-bit word of packed codes into 8 consecutive outputs and stores
# them as one 16-byte run, instead of interleaving the nibbles of a [blocks, block] tile (whose stores
# the compiler splits). H100, 14336 x 4096 bf16 (bench/sweep_nf4.py, docs/benchmarks.md session 16):
# 0.0614 ms (2.39 TB/s) with 1,024 outputs a program and 4 warps, against 0.0759 for the tiles at their
# best, 0.0748 for bitsandbytes and 0.0363 to merely write the output. Bit-identical either way.
# SLOTHNB_NF4_WORD_STORES=0: the tiles.
WORD_STORES = os.environ.get("SLOTHNB_NF4_WORD_STORES", "1") != "0"
WORD_OUTPUTS_PER_PROGRAM = 1024
NUM_WARPS = 4
# bf16 outputs stored as 32-bit words of two values instead of interleaved 16-bit ones. Off until
# bench/sweep_nf4.py has timed it on the GPU (it prints both); bit-identical either way.
PAIRED_STORES = False
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _block_scale(block, mask, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, BLOCKSIZE2: tl.constexpr,
                 NESTED: tl.constexpr):
    """The fp32 scale of quantisation blocks ``block``, decoding the nested level like bitsandbytes."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0).to(tl.float32)
    return scale


@triton.jit
def _decode_blocks(pid, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, n, row_len,
                   out_row_stride, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                   BF16: tl.constexpr, BLOCKS: tl.constexpr, PAIRS: tl.constexpr):
    """Program ``pid``'s BLOCKS quantisation blocks (see ``_dequantize_nf4_kernel``)."""
    block = pid * BLOCKS + tl.arange(0, BLOCKS)
    first = block * BLOCKSIZE  # flat index of each block's first element
    pair = tl.arange(0, BLOCKSIZE // 2)
    byte_mask = (first[:, None] + 2 * pair[None, :]) < n
    byte = tl.load(packed_ptr + first[:, None] // 2 + pair[None, :], mask=byte_mask, other=0).to(tl.int32)

    scale = _block_scale(block, first < n, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, BLOCKSIZE2, NESTED)
    high = tl.load(code_ptr + (byte >> 4)) * scale[:, None]  # even elements
    low = tl.load(code_ptr + (byte & 0xF)) * scale[:, None]  # odd elements
    if BF16:
        high, low = round_fp32_for_bf16(high), round_fp32_for_bf16(low)
    row, start = first // row_len, first % row_len
    if PAIRS:  # bf16 written as 32-bit words, even element in the low half (little-endian): no interleave
        word = (high.to(tl.uint32, bitcast=True) >> 16) | (low.to(tl.uint32, bitcast=True) & 0xFFFF0000)
        tl.store(out_ptr + ((row * out_row_stride + start) // 2)[:, None] + pair[None, :],
                 word.to(tl.int32, bitcast=True), mask=byte_mask)
    else:
        value = tl.interleave(high, low)  # [BLOCKS, BLOCKSIZE] in flat order
        col = tl.arange(0, BLOCKSIZE)
        mask = (first[:, None] + col[None, :]) < n
        tl.store(out_ptr + (row * out_row_stride + start)[:, None] + col[None, :],
                 value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_words(pid, words_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, n, row_len,
                  out_row_stride, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                  BF16: tl.constexpr, WORDS: tl.constexpr):
    """Program ``pid``'s WORDS 32-bit words of packed codes, 8 outputs each (see ``WORD_STORES``)."""
    word_idx = pid * WORDS + tl.arange(0, WORDS)
    first = word_idx * 8  # flat index of each word's first element; all 8 share a quantisation block
    ok = first < n
    word = tl.load(words_ptr + word_idx, mask=ok, other=0)
    j = tl.arange(0, 8)
    shift = (j // 2) * 8 + (1 - j % 2) * 4  # little-endian bytes; element 2i is byte i's high nibble
    nibble = (word[:, None] >> shift[None, :]) & 0xF
    scale = _block_scale(first // BLOCKSIZE, ok, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, BLOCKSIZE2, NESTED)
    value = tl.load(code_ptr + nibble) * scale[:, None]
    if BF16:
        value = round_fp32_for_bf16(value)
    start = (first // row_len) * out_row_stride + first % row_len  # 8 outputs never straddle a row here
    tl.store(out_ptr + start[:, None] + j[None, :], value.to(out_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _write_tail(tail_pid, tail_ptr, tail_row_stride, tail_scale, n_rows, out_ptr, row_len, out_row_stride,
                BF16: tl.constexpr, TAIL_ZEROS: tl.constexpr, TAIL_COLS: tl.constexpr, TAIL_BLOCK: tl.constexpr,
                TAIL_ROWS: tl.constexpr):
    """TAIL_ROWS rows' columns after the weight: TAIL_ZEROS zeros, then ``tail_scale * tail[row]``."""
    rows = tail_pid * TAIL_ROWS + tl.arange(0, TAIL_ROWS)
    col = tl.arange(0, TAIL_BLOCK)
    row_ok = rows < n_rows
    in_tail = (col >= TAIL_ZEROS) & (col < TAIL_ZEROS + TAIL_COLS)
    t = tl.load(tail_ptr + rows[:, None] * tail_row_stride + (col - TAIL_ZEROS)[None, :],
                mask=row_ok[:, None] & in_tail[None, :], other=0.0).to(tl.float32) * tail_scale
    if BF16:
        t = round_fp32_for_bf16(t)
    tl.store(out_ptr + rows[:, None] * out_row_stride + row_len + col[None, :], t.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (col < TAIL_ZEROS + TAIL_COLS)[None, :])


@fast_launch
@triton.jit
def _dequantize_nf4_kernel(
    packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, n, row_len, out_row_stride,
    tail_ptr, tail_row_stride, tail_scale, n_rows, main_programs,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BF16: tl.constexpr,
    BLOCKS: tl.constexpr, PAIRS: tl.constexpr,
    TAIL: tl.constexpr, TAIL_ZEROS: tl.constexpr, TAIL_COLS: tl.constexpr, TAIL_BLOCK: tl.constexpr,
    TAIL_ROWS: tl.constexpr, WORDS: tl.constexpr,
):
    """BLOCKS quantisation blocks per program, one row each: the block's scale is decoded once, the
    two nibbles of each byte are interleaved in registers (or, with PAIRS, packed into one 32-bit word
    of two bf16s), and a block's BLOCKSIZE outputs are stored as one contiguous run at
    ``row * out_row_stride + col`` of its first element, so the output may be a slice of a wider
    buffer when rows are whole blocks.

    With TAIL, the programs from ``main_programs`` on write each row's columns right after the
    weight instead (TAIL_ROWS rows a program): TAIL_ZEROS zeros, then ``tail_scale * tail[row]``
    (TAIL_COLS values, rounded once, as ``copy_`` then ``mul_`` would)."""
    pid = tl.program_id(0).to(tl.int64)
    if TAIL and pid >= main_programs:
        _write_tail(pid - main_programs, tail_ptr, tail_row_stride, tail_scale, n_rows, out_ptr, row_len,
                    out_row_stride, BF16, TAIL_ZEROS, TAIL_COLS, TAIL_BLOCK, TAIL_ROWS)
    elif WORDS > 0:  # packed_ptr holds 32-bit words
        _decode_words(pid, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, n,
                      row_len, out_row_stride, BLOCKSIZE, BLOCKSIZE2, NESTED, BF16, WORDS)
    else:
        _decode_blocks(pid, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, n,
                       row_len, out_row_stride, BLOCKSIZE, BLOCKSIZE2, NESTED, BF16, BLOCKS, PAIRS)


def _resolve(packed, quant_state):
    """(packed bytes, quant_state), accepting a ``bnb.nn.Params4bit`` that carries its own state."""
    if quant_state is None:
        quant_state = getattr(packed, "quant_state", None)
    if quant_state is None:
        raise ConfigError(
            "dequantize_nf4 needs the bitsandbytes QuantState of the weight: pass `quant_state=` "
            "or a bitsandbytes Params4bit (which carries `.quant_state`)."
        )
    if getattr(quant_state, "quant_type", None) != "nf4":
        raise ConfigError(
            f"dequantize_nf4 only decodes NF4 weights, got quant_type={quant_state.quant_type!r}; "
            "load the model with bnb_4bit_quant_type='nf4'."
        )
    data = packed.data if isinstance(packed, torch.nn.Parameter) else packed
    data = data.detach().contiguous()
    if data.dtype != torch.uint8:
        data = data.view(torch.uint8)
    n = 1
    for s in quant_state.shape:
        n *= int(s)
    if data.numel() * 2 < n:
        raise ConfigError(
            f"packed weight holds {data.numel() * 2} 4-bit codes but quant_state.shape "
            f"{tuple(quant_state.shape)} needs {n}: the weight and its quant_state do not belong together."
        )
    return data.reshape(-1), quant_state, n


def _absmax_fp32(quant_state) -> torch.Tensor:
    """Per-block fp32 scales, decoding the nested (double-quantised) level like bitsandbytes."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    s2 = quant_state.state2
    scales = s2.code.float()[quant_state.absmax.long()]
    outer = s2.absmax.float().repeat_interleave(s2.blocksize)[: scales.numel()]
    return scales * outer + quant_state.offset.float()


def dequantize_nf4_reference(packed, quant_state=None, dtype=None) -> torch.Tensor:
    """Plain-PyTorch dequantisation, the same fp32 arithmetic as bitsandbytes (the CPU path)."""
    data, quant_state, n = _resolve(packed, quant_state)
    dtype = dtype or quant_state.dtype
    codes = torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1)[:n].long()
    values = quant_state.code.float().to(data.device)[codes]
    scales = _absmax_fp32(quant_state).to(data.device).repeat_interleave(quant_state.blocksize)[:n]
    return (values * scales).to(dtype).reshape(quant_state.shape)


class _Decoded(NamedTuple):
    """What a launch needs of one NF4 weight, on its device (see ``_decoded``)."""
    data: torch.Tensor  # flat uint8
    shape: tuple
    n: int
    dtype: torch.dtype  # the dtype it was quantised from
    blocksize: int
    nested: bool
    absmax: torch.Tensor
    code: torch.Tensor
    absmax2: torch.Tensor
    code2: torch.Tensor
    offset: torch.Tensor
    blocksize2: int
    words: Optional[torch.Tensor]  # data as int32 (4 packed bytes, 8 codes) when its size and alignment allow
    plans: dict  # _geometry(...) -> BoundLaunch: this weight's launches already made, by output geometry


_DECODED: dict = {}  # id(packed) -> (weakref(packed), quant_state, data_ptr, _Decoded)


def _decoded(packed, quant_state) -> _Decoded:
    """The checked, flattened weight and its device-side tables, cached per weight.

    A training step dequantises a projection up to three times (forward, recompute, backward): ~480
    calls a step for Llama-3.1-8B, each of which would otherwise re-check the state and make five
    ``.to(device)`` calls. The weights are frozen, so the entry stays valid while the same tensor
    (same storage) and quant_state are passed; anything else decodes afresh.
    """
    key = id(packed)
    hit = _DECODED.get(key)
    if hit is not None and hit[0]() is packed and (quant_state is None or hit[1] is quant_state) \
            and hit[2] == packed.data_ptr():
        return hit[3]
    data, qs, n = _resolve(packed, quant_state)
    device = data.device
    code = qs.code.to(device=device, dtype=torch.float32)
    if qs.nested:
        s2 = qs.state2
        absmax, absmax2 = qs.absmax.to(device), s2.absmax.to(device=device, dtype=torch.float32)
        code2 = s2.code.to(device=device, dtype=torch.float32)
        offset = qs.offset.to(device=device, dtype=torch.float32).reshape(1)
        blocksize2 = int(s2.blocksize)
    else:
        absmax = qs.absmax.to(device=device, dtype=torch.float32)
        absmax2 = code2 = offset = absmax  # unused placeholders
        blocksize2 = 1
    words = data.view(torch.int32) if n % 8 == 0 and data.numel() % 4 == 0 and data.data_ptr() % 4 == 0 else None
    decoded = _Decoded(data, tuple(int(s) for s in qs.shape), n, qs.dtype, int(qs.blocksize), bool(qs.nested),
                       absmax, code, absmax2, code2, offset, blocksize2, words, {})
    try:
        ref = weakref.ref(packed, lambda _, k=key: _DECODED.pop(k, None))
    except TypeError:  # not weak-referenceable: not cached
        return decoded
    _DECODED[key] = (ref, qs, packed.data_ptr(), decoded)
    return decoded


TAIL_ROWS = 32  # rows a tail program writes (``dequantize_nf4(tail=...)``)

# A weight's launches are bound by the geometry of their output (``FastLaunch.bind``): the next call with
# the same geometry launches in C at once, without the checks and the arithmetic below and without the
# launch key (~19 -> ~5 us of host a call on the development CPU, bench/nf4_host.py; ~480 calls an 8B QLoRA
# step, 4-30 ms of host a step on the H100 machines).
# SLOTHNB_NF4_BIND=0 turns it off (benchmarks). MAX_PLANS bounds the geometries kept per weight.
BIND = os.environ.get("SLOTHNB_NF4_BIND", "1") != "0"
MAX_PLANS = 16
_BOUND_SLOTS = (6, 10)  # the kernel's out_ptr and tail_ptr (out again without a tail)


def _geometry(dtype, out, tail):
    """What makes two calls on one weight the same launch: the dtype asked for, and everything of ``out``
    and ``tail`` that the launch's arguments, its checks or Triton's specialisation read."""
    key = (dtype, out.dtype, out.device, out.shape, out.stride(), out.storage_offset(),
           out.untyped_storage().nbytes(), out.data_ptr() % 16 == 0,
           WORD_STORES, OUTPUTS_PER_PROGRAM, WORD_OUTPUTS_PER_PROGRAM, NUM_WARPS, TAIL_ROWS)  # swept by benchmarks
    if tail is None:
        return key
    T, scale, zeros = tail
    return key + (T.dtype, T.device, T.shape, T.stride(), T.data_ptr() % 16 == 0, float(scale), int(zeros))


def dequantize_nf4(packed, quant_state=None, dtype=None, out=None, tail=None) -> torch.Tensor:
    """The dense weight (``quant_state.shape``) in ``dtype`` (default: the dtype it was quantised from).

    ``packed``: the packed uint8 (or other ``quant_storage``) tensor, or a ``bnb.nn.Params4bit``.
    ``out``: where to write it, e.g. the columns ``[:, :in]`` of a wider buffer (the fused LoRA
    ops put ``s B`` beside ``W`` and run one matmul); a 2-D tensor of the weight's shape with unit-stride
    columns, whose dtype is the output dtype. A strided ``out`` needs rows that are whole
    quantisation blocks (true of every real model).

    ``tail=(T, scale, zeros)``: also write, in each row of the buffer ``out`` is the left part of, the
    columns right after the weight: ``zeros`` zeros, then ``scale * T[row]`` (T ``[rows, r]``, out's
    dtype: an adapter's B), in the same launch. The same values as ``buf[:, in:in + zeros].zero_()``,
    ``buf[:, in + zeros:].copy_(T)``, ``.mul_(scale)``, without their launches (the fused LoRA
    ops widen five projections a layer this way, in forward and again in the recompute).
    """
    # On the device with the cached plain tensor: a bitsandbytes Params4bit answers every attribute read
    # through Python (~1.5 us), and a training step dequantises ~480 times.
    w = _decoded(packed, quant_state)
    key = None
    if BIND and w.plans:  # this weight was launched on a GPU before: a launch of the same geometry is bound
        if out is None and tail is None:
            out = torch.empty(w.shape, dtype=dtype or w.dtype, device=w.data.device)
        if out is not None:
            key = _geometry(dtype, out, tail)
            bound = w.plans.get(key)
            if bound is not None and bound(out, out if tail is None else tail[0]):
                return out
    if tail is not None:
        _check_tail(out, tail)
    if not use_triton(w.data):
        dense = dequantize_nf4_reference(packed, quant_state, dtype or (out.dtype if out is not None else None))
        if out is None:
            return dense
        _check_out(out, tuple(dense.shape), dense.dtype)
        out.copy_(dense)
        if tail is not None:
            _write_tail_torch(out, tail)
        return out
    asked = dtype
    shape, n = w.shape, w.n
    if out is not None:
        dtype = dtype or out.dtype
        _check_out(out, shape, dtype)
    dtype = dtype or w.dtype
    if dtype not in OUT_DTYPES:
        raise ConfigError(f"dequantize_nf4 writes one of {OUT_DTYPES}, not {dtype}.")
    strided = out is not None and len(shape) == 2 and not out.is_contiguous()
    if strided and shape[1] % w.blocksize:
        raise ConfigError(f"dequantize_nf4 into a strided out= needs rows of whole blocks: {shape[1]} columns, "
                          f"blocks of {w.blocksize}.")
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=w.data.device)
    if n == 0 or (tail is not None and dtype == torch.float64):  # the kernel's tail multiplies in fp32
        if n:
            dequantize_nf4(packed, quant_state, dtype, out)
        if tail is not None:
            _write_tail_torch(out, tail)
        return out
    row_len, row_stride = (shape[1], out.stride(0)) if strided else (n, n)
    blocks = max(1, OUTPUTS_PER_PROGRAM // w.blocksize)
    words = WORD_STORES and w.words is not None and w.blocksize % 8 == 0 and (not strided or row_len % 8 == 0)
    main = cdiv(n // 8, WORD_OUTPUTS_PER_PROGRAM // 8) if words else cdiv(cdiv(n, w.blocksize), blocks)
    pairs = (PAIRED_STORES and not words and tail is None and dtype == torch.bfloat16 and n % 2 == 0
             and row_stride % 2 == 0 and out.storage_offset() % 2 == 0)
    if tail is not None:
        T, scale, zeros = tail
        rows = shape[0]
        if not strided:  # rows with room after them are strided; a [rows, in] buffer of one row is not
            row_len, row_stride = shape[1], out.stride(0)
        tail_args = (T, T.stride(0), float(scale), rows, main)
        tail_meta = dict(TAIL=True, TAIL_ZEROS=int(zeros), TAIL_COLS=T.shape[1],
                         TAIL_BLOCK=next_power_of_2(int(zeros) + T.shape[1]), TAIL_ROWS=TAIL_ROWS)
        grid = (main + cdiv(rows, TAIL_ROWS),)
    else:
        tail_args = (out, 0, 1.0, 0, main)
        tail_meta = dict(TAIL=False, TAIL_ZEROS=0, TAIL_COLS=0, TAIL_BLOCK=1, TAIL_ROWS=1)
        grid = (main,)
    args = (w.words if words else w.data, w.absmax, w.code, w.absmax2, w.code2, w.offset,
            _as_words(out) if pairs else out, n, row_len, row_stride, *tail_args)
    meta = dict(BLOCKSIZE=w.blocksize, BLOCKSIZE2=w.blocksize2, NESTED=w.nested, BF16=dtype == torch.bfloat16,
                BLOCKS=blocks, PAIRS=pairs, **tail_meta, WORDS=WORD_OUTPUTS_PER_PROGRAM // 8 if words else 0,
                num_warps=NUM_WARPS, enable_fp_fusion=False)
    if not BIND or pairs or len(w.plans) >= MAX_PLANS:
        _dequantize_nf4_kernel[grid](*args, **meta)
        return out
    bound = _dequantize_nf4_kernel.bind(grid, args, meta, _BOUND_SLOTS)
    if bound is not None:
        w.plans[key if key is not None else _geometry(asked, out, tail)] = bound
    return out


def _write_tail_torch(out: torch.Tensor, tail) -> None:
    """``tail``'s columns written op by op (the CPU path, and float64, which the kernel would round)."""
    T, scale, zeros = tail
    right = out.as_strided((out.shape[0], zeros + T.shape[1]), (out.stride(0), 1), out.storage_offset() + out.shape[1])
    right[:, :zeros].zero_()
    right[:, zeros:].copy_(T)
    if scale != 1.0:
        right[:, zeros:].mul_(scale)


def _check_tail(out, tail):
    """``tail`` fits the buffer ``out`` is the left part of, and matches its dtype and rows."""
    if out is None or out.dim() != 2:
        raise ConfigError("dequantize_nf4 tail= needs out=, the left columns of a 2-D buffer.")
    T, scale, zeros = tail
    rows, cols = out.shape[0], int(zeros) + T.shape[-1]
    end = out.storage_offset() + (rows - 1) * out.stride(0) + out.shape[1] + cols if rows else 0
    if (T.dim() != 2 or T.shape[0] != rows or T.dtype != out.dtype or T.device != out.device
            or (T.numel() and T.stride(1) != 1) or zeros < 0 or out.stride(-1) != 1
            or out.stride(0) < out.shape[1] + cols or end * out.element_size() > out.untyped_storage().nbytes()):
        raise ConfigError(
            f"dequantize_nf4 tail= must be ([{rows}, r] {out.dtype} on {out.device} with unit-stride columns, "
            f"scale, zeros >= 0), and out's rows must have room for zeros + r more columns: got T "
            f"{tuple(T.shape)} {T.dtype} strides {tuple(T.stride())}, zeros {zeros}, out {tuple(out.shape)} "
            f"strides {tuple(out.stride())}.")


def _check_out(out, shape, dtype):
    if tuple(out.shape) != shape or out.dtype != dtype or (out.numel() and out.stride(-1) != 1):
        raise ConfigError(f"dequantize_nf4 out= must be a {shape} {dtype} tensor with unit-stride columns, "
                          f"got {tuple(out.shape)} {out.dtype} strides {tuple(out.stride())}.")


def _as_words(out: torch.Tensor) -> torch.Tensor:
    """The same memory as int32 pairs of bf16 (the kernel indexes it in words from element offsets / 2)."""
    return out.view(-1).view(torch.int32) if out.is_contiguous() else out.view(torch.int32)


__all__ = ["dequantize_nf4", "dequantize_nf4_reference"]
