"""kernels/adapter_casts.py: adapters in the compute dtype once a pass, packed adapters cast in one launch."""
import torch

from slothnb.kernels import adapter_casts as casts


def test_adapter_casts_live_for_one_model_pass():
    """fp32 adapters under a 16-bit compute dtype are cast once per model pass, and a fused AdamW
    step (which updates in place without bumping ``_version``) is never served a stale copy."""
    A = torch.nn.Parameter(torch.randn(4, 16))
    casts.begin_pass()
    first = casts._cast(A, torch.bfloat16)
    assert casts._cast(A, torch.bfloat16) is first and torch.equal(first, A.detach().to(torch.bfloat16))
    assert casts._cast(A, torch.float32) is A  # nothing to cast
    A.grad = torch.ones_like(A)
    torch.optim.AdamW([A], lr=0.5, fused=True).step()
    assert A._version == 0  # why the cache cannot key on the version alone
    casts.begin_pass()
    second = casts._cast(A, torch.bfloat16)
    assert second is not first and torch.equal(second, A.detach().to(torch.bfloat16))
    key = id(A)
    del A
    assert key not in casts._CASTS  # dropped with the parameter


class _CountCasts(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.casts += func.overloadpacket is torch.ops.aten._to_copy
        return func(*args, **(kwargs or {}))


def test_packed_adapters_are_cast_with_one_launch_a_pass():
    """pack_adapters: the parameters become views of one tensor (same objects, same values); a pass
    casts them all with one cast, each ``_cast`` is a view of it with the bits of its own ``.to()``."""
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in ((4, 16), (2, 16), (16, 4), (16, 2))]
    values = [p.detach().clone() for p in ps]
    ids = [id(p) for p in ps]
    assert casts.pack_adapters(ps) == 4
    assert [id(p) for p in ps] == ids and all(torch.equal(p, v) for p, v in zip(ps, values))
    assert len({p.untyped_storage().data_ptr() for p in ps}) == 1
    casts.begin_pass()
    with _CountCasts() as counted:
        copies = [casts._cast(p, torch.bfloat16) for p in ps]
    assert counted.casts == 1
    assert all(torch.equal(c, p.detach().to(torch.bfloat16)) for c, p in zip(copies, ps))
    stacked = casts._stacked(copies[:2])  # the A's lie side by side: a view, no concatenation
    assert stacked.data_ptr() == copies[0].data_ptr() and torch.equal(stacked, torch.cat(copies[:2]))

    ps[0].grad = torch.ones_like(ps[0])
    torch.optim.AdamW(ps[:1], lr=0.5, fused=True).step()  # in place, no version bump: the next pass sees it
    casts.begin_pass()
    assert torch.equal(casts._cast(ps[0], torch.bfloat16), ps[0].detach().to(torch.bfloat16))

    with torch.no_grad():
        ps[1].add_(1.0)  # changed in place within a pass: cast alone, not served the pack's old values
    fresh = casts._cast(ps[1], torch.bfloat16)
    assert torch.equal(fresh, ps[1].detach().to(torch.bfloat16))
    ps[2].data = ps[2].data.clone()  # moved away from the pack (as model.to() does): the plain path
    casts.begin_pass()
    moved = casts._cast(ps[2], torch.bfloat16)
    assert torch.equal(moved, ps[2].detach().to(torch.bfloat16))
    assert moved.untyped_storage().data_ptr() != casts._cast(ps[3], torch.bfloat16).untyped_storage().data_ptr()
    key = id(ps[3])
    del ps[3]
    assert key not in casts._PACKS  # dropped with the parameter


def test_stacked_adapters_of_separate_tensors_are_concatenated():
    from slothnb.kernels.lora import _adapter_inputs


    As = [torch.randn(3, 8), torch.randn(5, 8)]
    assert torch.equal(casts._stacked(As), torch.cat(As))
    X = torch.randn(6, 8, dtype=torch.float64)
    for xa, A in zip(_adapter_inputs(X, [A.double() for A in As]), As):
        torch.testing.assert_close(xa, X @ A.double().t())
