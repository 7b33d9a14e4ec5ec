"""Embedding rows gathered by a kernel (slothnb.kernels.row_gather) against F.embedding: bit for bit,
widths below, at and above one block, repeated ids, the first and last rows, empty ids; on the GPU
from a pinned host table, without a device sync."""
import pytest
import torch
import torch.nn.functional as F

from slothnb.kernels.row_gather import BLOCK, gather_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [7, 576, BLOCK, BLOCK + 3])
def test_gathers_the_rows_bit_for_bit(dtype, width):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, width, generator=g).to(dtype)
    ids = torch.tensor([[0, 49, 3, 3], [17, 0, 49, 8]])
    got = gather_rows(table, ids)
    assert got.shape == (2, 4, width) and got.dtype == dtype
    assert torch.equal(got, F.embedding(ids, table))


def test_no_ids_and_a_bad_table():
    table = torch.randn(10, 8)
    assert gather_rows(table, torch.empty(0, dtype=torch.long)).shape == (0, 8)
    with pytest.raises(ValueError, match="contiguous 2-D"):
        gather_rows(table.t(), torch.tensor([1]))


def test_out_of_range_ids_read_row_zero_instead_of_faulting():
    """The kernel never reads outside the table; the caller asserts the range on the device."""
    table = torch.arange(12.0).view(4, 3)
    got = gather_rows(table, torch.tensor([2, 4, -1]))
    assert torch.equal(got, table[[2, 0, 0]])


@pytest.mark.gpu
@pytest.mark.parametrize("width", [576, 4096])
def test_reads_a_pinned_host_table_on_gpu_without_a_sync(width):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    table = torch.randn(32000, width).to(torch.bfloat16).pin_memory()
    ids = torch.randint(0, 32000, (2, 4096), device="cuda")
    ids[0, 0], ids[1, -1] = 0, 31999
    torch.cuda.set_sync_debug_mode("error")  # a copy of the ids to the host would raise here
    try:
        got = gather_rows(table, ids)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert got.is_cuda and torch.equal(got, F.embedding(ids, table.cuda()))
