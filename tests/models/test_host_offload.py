"""Pinned host copies of layer inputs (slothnb.models.host_offload): the budget, the round trip, the prefetch;
and the pool of pinned buffers under them (slothnb.models.pinned_pool)."""
import pytest
import torch

from slothnb.errors import ConfigError
from slothnb.models import host_offload, pinned_pool


@pytest.mark.gpu
def test_offload_round_trip_on_gpu():
    x = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16)
    expected = x.clone()
    off = host_offload.OffloadedTensor(x)
    assert off.buf.is_pinned() and off.buf.device.type == "cpu"
    del x  # the GPU copy may now be reused; the pinned copy must still be intact
    torch.empty(4, 256, 512, device="cuda", dtype=torch.bfloat16).fill_(7)
    back = off.restore()
    torch.cuda.synchronize()
    assert back.is_cuda and torch.equal(back, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("fast", [True, False])
def test_copies_wait_for_the_current_stream_and_leave_it_current_on_gpu(fast, monkeypatch):
    """Under a user's stream: the device->host copy waits for the work queued before it (a long sleep,
    then the write of x), the host->device copy for the work queued before the restore, and the user's
    stream is current again after each (``host_offload``'s direct stream calls, and torch.cuda's)."""
    monkeypatch.setattr(host_offload, "FAST_STREAMS", fast)
    user = torch.cuda.Stream()
    src = torch.randn(2, 512, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.cuda.stream(user):
        x = torch.zeros_like(src)
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time before x is written
        x.copy_(src)
        off = host_offload.OffloadedTensor(x)
        assert torch.cuda.current_stream() == user
        del x
        torch.cuda._sleep(100_000_000)
        back = off.restore()
        assert torch.cuda.current_stream() == user
        doubled = back * 2  # queued on the user's stream after its wait for the copy
    torch.cuda.synchronize()
    assert torch.equal(back, src) and torch.equal(doubled, src * 2)


@pytest.mark.gpu
def test_large_pinned_buffers_pin_their_own_size_not_a_power_of_two_on_gpu():
    stats = torch.cuda.host_memory_stats
    before = stats().get("allocated_bytes.all.current", 0)
    shape = (3 * 2**20 + 5, 2)  # 12 MiB + 20 bytes of bf16: torch's pinned allocator would take 16 MiB
    buf = pinned_pool.pinned_empty(shape, torch.bfloat16)
    assert buf.is_pinned() and buf.shape == shape
    assert stats().get("allocated_bytes.all.current", 0) == before  # registered in place, not from the caching pool
    x = torch.randn(shape, device="cuda").to(torch.bfloat16)
    buf.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(buf.cuda(), x)
    small = pinned_pool.pinned_empty((1024,), torch.float32)  # small: the caching allocator, rounding harmless
    assert small.is_pinned()


def test_pinned_empty_falls_back_to_torch_when_registering_fails(monkeypatch):
    registered, pin_requests = [], []

    class FailingCudart:
        def cudaHostRegister(self, ptr, nbytes, flags):
            registered.append(nbytes)
            return 1  # an error code

    def check_error(code):
        if code:
            raise RuntimeError(f"CUDA error {code}")

    real_empty = torch.empty

    def empty(*shape, pin_memory=False, **kwargs):  # records the request; this CPU has no pinned memory
        pin_requests.append(pin_memory)
        return real_empty(*shape, **kwargs)

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FailingCudart())
    monkeypatch.setattr(torch.cuda, "check_error", check_error)
    monkeypatch.setattr(torch, "empty", empty)
    pinned_pool.pinned_empty((3 * 2**20 + 5,), torch.float32)
    assert registered == [(3 * 2**20 + 5) * 4]  # it tried to pin the exact size in place ...
    assert pin_requests[-1] is True  # ... then asked torch's pinned allocator


@pytest.mark.gpu
def test_restore_prefetches_the_previous_layer_on_gpu():
    a = torch.randn(8, 128, device="cuda")
    b = torch.randn(8, 128, device="cuda")
    off_a, off_b = host_offload.OffloadedTensor(a), host_offload.OffloadedTensor(b)  # forward order: a, then b
    assert off_b.prev() is off_a
    back_b = off_b.restore()  # backward order: b first; a's copy is queued now
    assert off_a.gpu is not None and off_a.ready is not None
    back_a = off_a.restore()
    torch.cuda.synchronize()
    assert torch.equal(back_b, b) and torch.equal(back_a, a)


@pytest.mark.gpu
def test_carried_values_travel_with_their_layer_input_on_gpu():
    x0, c1, x1 = (torch.randn(8, 128, device="cuda") for _ in range(3))
    off_x0 = host_offload.OffloadedTensor(x0)
    off_c1 = host_offload.OffloadedTensor(c1, carried=True)
    off_x1 = host_offload.OffloadedTensor(x1)
    back_x1 = off_x1.restore()  # the last layer's backward: layer 0's input is queued, nothing beyond
    assert off_c1.gpu is not None and off_x0.gpu is not None
    back_c1, back_x0 = off_c1.restore(), off_x0.restore()
    torch.cuda.synchronize()
    assert torch.equal(back_x1, x1) and torch.equal(back_c1, c1) and torch.equal(back_x0, x0)


def test_a_restore_prefetches_the_next_layer_input_and_what_it_carries(monkeypatch):
    """Forward order: input 0, [carried 1, input 1], [carried 2, input 2] (a layer's carried values are
    offloaded during its forward, its input after it). Restoring input 2 must queue carried 2, input 1 and
    carried 1 (the next layer's group), not input 0."""
    import weakref

    fetched = []
    monkeypatch.setattr(host_offload.OffloadedTensor, "prefetch", lambda self: fetched.append(self.name))
    chain, prev = [], None
    for name, carried in (("in0", False), ("c1", True), ("in1", False), ("c2", True), ("in2", False)):
        t = object.__new__(host_offload.OffloadedTensor)
        t.name, t.carried, t.device, t.prev, t.buf = name, carried, "cuda:0", prev, None
        chain.append(t)
        prev = weakref.ref(t)
    chain[-1]._prefetch_next_layer()
    assert fetched == ["c2", "in1", "c1"]
    fetched.clear()
    chain[1].carried = chain[3].carried = False  # nothing carried: one layer input ahead, as before
    chain[-1]._prefetch_next_layer()
    assert fetched == ["c2"]


def test_prefetches_are_queued_in_the_order_the_backward_reads_them(monkeypatch):
    """Two layers that carry their attention output, G and U: restoring layer 2's input queues layer 2's
    carried values, then layer 1's input, then layer 1's carried values, each in forward order."""
    import weakref

    fetched = []
    monkeypatch.setattr(host_offload.OffloadedTensor, "prefetch", lambda self: fetched.append(self.name))
    chain, prev = [], None  # the list keeps them alive: each holds only a weak reference to the one before
    for name in ("in0", "a1", "g1", "u1", "in1", "a2", "g2", "u2", "in2"):
        t = object.__new__(host_offload.OffloadedTensor)
        t.name, t.carried, t.device, t.prev, t.buf = name, not name.startswith("in"), "cuda:0", prev, None
        chain.append(t)
        prev = weakref.ref(t)
    chain[-1]._prefetch_next_layer()
    assert fetched == ["a2", "g2", "u2", "in1", "a1", "g1", "u1"]


def test_host_budget_admits_until_full_and_counts_bytes_in_use():
    budget = host_offload.HostBudget(limit_bytes=100)
    assert [budget.admit(40) for _ in range(3)] == [True, True, False]  # 120 > 100: stays on the GPU
    assert budget.in_use == 80
    budget.release(40), budget.release(40)  # backward restored both: the next step starts from zero
    assert budget.in_use == 0 and budget.admit(100) and not budget.admit(1)
    assert budget.peak == 100  # the most held at once, what the long-context bench reports


def test_host_budget_limit_from_env_or_half_the_available_memory(monkeypatch):
    import psutil

    monkeypatch.setenv("SLOTHNB_OFFLOAD_HOST_GIB", "1.5")
    assert host_offload.default_host_budget_bytes() == int(1.5 * 1024**3)
    monkeypatch.setenv("SLOTHNB_OFFLOAD_HOST_GIB", "lots")
    with pytest.raises(ConfigError, match="SLOTHNB_OFFLOAD_HOST_GIB"):
        host_offload.default_host_budget_bytes()
    monkeypatch.delenv("SLOTHNB_OFFLOAD_HOST_GIB")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 1000})())
    budget = host_offload.HostBudget()
    assert budget.admit(700) and not budget.admit(1) and budget.limit == 700  # read once, at the first offload


def test_an_offload_never_restored_releases_its_bytes(monkeypatch):
    budget = host_offload.HostBudget(limit_bytes=10)
    monkeypatch.setattr(host_offload, "HOST_BUDGET", budget)
    assert budget.admit(8)
    off = object.__new__(host_offload.OffloadedTensor)  # as built on CUDA, without the copy
    off.nbytes, off.buf = 8, torch.empty(2)
    del off  # its forward was dropped without a backward
    assert budget.in_use == 0


def _fake_pinning(monkeypatch):
    """A fresh pool whose 'pinned' buffers are plain CPU tensors (this CPU has no pinned memory)."""
    made = []

    def pinned_empty(shape, dtype, touch=False):
        made.append((tuple(shape), touch))
        return torch.empty(shape, dtype=dtype)

    pool = pinned_pool.PinnedPool(host_offload.COUNTS)
    monkeypatch.setattr(pinned_pool, "pinned_empty", pinned_empty)
    monkeypatch.setattr(host_offload, "_POOL", pool)
    return pool, made


def test_carried_values_never_wait_for_pinning_the_pool_grows_in_the_background(monkeypatch):
    pool, made = _fake_pinning(monkeypatch)
    x = torch.ones(4, 8)
    assert not pool.ready(x.shape, x.dtype, 2)  # nothing free: two buffers are requested, none made inline
    pool.wait_for_pinning()
    assert made == [((4, 8), True), ((4, 8), True)]  # pages touched off the training thread
    assert pool.ready(x.shape, x.dtype, 2)
    a, b = pool.take_ready(x.shape, x.dtype), pool.take_ready(x.shape, x.dtype)
    assert a is not None and b is not None and a is not b
    assert pool.take_ready(x.shape, x.dtype, grow=False) is None  # both taken, nothing requested
    pool.give(a)
    assert pool.take_ready(x.shape, x.dtype) is a  # reused, not re-pinned
    # a layer input cannot wait: it pins inline on a miss
    assert pool.take((2, 2), x.dtype).shape == (2, 2) and made[-1] == ((2, 2), False)


def test_background_pinning_requests_are_bounded(monkeypatch):
    pool, made = _fake_pinning(monkeypatch)
    gate = __import__("threading").Event()
    real = pinned_pool.pinned_empty
    monkeypatch.setattr(pinned_pool, "pinned_empty", lambda *a, **k: gate.wait() and real(*a, **k))
    pool.max_pending = 5
    assert not pool.ready((4, 8), torch.float32, 2)  # one layer's G and U missing: two requests
    assert not pool.ready((4, 8), torch.float32, 2)  # the next layer's too: two more
    assert not pool.ready((4, 8), torch.float32, 2)  # only one more fits under max_pending
    assert not pool.ready((4, 8), torch.float32, 2)  # none
    assert sum(pool._pending.values()) == 5
    gate.set()
    pool.wait_for_pinning()
    assert len(made) == 5 and len(pool._free[((4, 8), torch.float32)]) == 5


def test_a_forward_asks_for_all_it_was_refused_at_once(monkeypatch):
    """The first step of an 8B run is refused ~16 G/U pairs: all are pinned for the second step, not at most
    16 buffers at a time spread over five steps (the timed steps then paid for the pinning)."""
    pool, made = _fake_pinning(monkeypatch)
    gate = __import__("threading").Event()  # the pinning thread waits until the forward is over
    real = pinned_pool.pinned_empty
    monkeypatch.setattr(pinned_pool, "pinned_empty", lambda *a, **k: gate.wait() and real(*a, **k))
    for _ in range(20):  # twenty layers' G and U refused in one forward
        assert not pool.ready((4, 8), torch.float32, 2)
    gate.set()
    pool.wait_for_pinning()
    assert len(made) == 40 and all(touch for _, touch in made)
    for _ in range(20):  # the next forward finds them all
        assert pool.ready((4, 8), torch.float32, 2)
        assert pool.take_ready((4, 8), torch.float32) is not None and pool.take_ready((4, 8), torch.float32) is not None


def test_buffers_still_being_pinned_are_not_asked_for_again(monkeypatch):
    """A forward that starts while the last one's buffers are still being pinned is refused again by the same
    layers: those refusals are covered by the buffers on their way; only new ones are asked for."""
    pool, made = _fake_pinning(monkeypatch)
    gate = __import__("threading").Event()
    real = pinned_pool.pinned_empty
    monkeypatch.setattr(pinned_pool, "pinned_empty", lambda *a, **k: gate.wait() and real(*a, **k))
    key = ((4, 8), torch.float32)
    assert not pool.ready(*key, 2) and not pool.ready(*key, 2)  # round 1: two layers refused, four pinning
    pool.give(torch.empty(2, 2))  # its backward gives a layer input's buffer back: the round ends
    assert not pool.ready(*key, 2) and not pool.ready(*key, 2)  # round 2, the same two layers: nothing new
    assert pool._pending[key] == 4
    assert not pool.ready(*key, 2)  # a third layer refused in round 2: two more
    assert pool._pending[key] == 6
    gate.set()
    pool.wait_for_pinning()
    assert len(made) == 6 and len(pool._free[key]) == 6


def test_offload_carried_refuses_without_a_free_buffer_and_releases_the_budget(monkeypatch):
    pool, _ = _fake_pinning(monkeypatch)
    budget = host_offload.HostBudget(limit_bytes=1 << 20)
    monkeypatch.setattr(host_offload, "HOST_BUDGET", budget)
    made = []
    monkeypatch.setattr(host_offload, "OffloadedTensor",
                        lambda x, carried=False, buf=None: made.append((carried, buf)) or "offloaded")
    x = torch.ones(4, 8)
    assert host_offload.offload_carried(x) is None and budget.in_use == 0  # recomputed this time
    pool.wait_for_pinning()
    assert host_offload.offload_carried(x) == "offloaded" and budget.in_use == x.nbytes
    assert made[0][0] is True and made[0][1].shape == x.shape  # handed the pooled buffer


def test_the_host_waits_for_copies_more_than_a_few_layers_old(monkeypatch):
    """The host queues a forward far ahead of the GPU; each tensor waiting for its copy stays allocated.
    Past LAYERS_AHEAD layer inputs in flight, the host waits for the oldest copy."""
    import collections
    import time

    waited = []

    class Event:
        def __init__(self, i):
            self.i = i

        def synchronize(self):
            time.sleep(0.02)  # the copy finishes 20 ms later
            waited.append(self.i)

        def query(self):
            return self.i in waited

    monkeypatch.setattr(host_offload, "_LAYER_COPIES", collections.deque())
    monkeypatch.setattr(host_offload, "_IN_FLIGHT", collections.deque())
    monkeypatch.setattr(host_offload, "COUNTS", collections.Counter())
    monkeypatch.setattr(host_offload, "LAYERS_AHEAD", 3)
    monkeypatch.setattr(host_offload, "AHEAD_BYTES", 0)  # no further lead for small tensors
    for i in range(6):
        host_offload._IN_FLIGHT.append((Event(i), torch.empty(1), Event(i)))
        host_offload._keep_pace(host_offload._IN_FLIGHT[-1][0])
    assert waited == [0, 1, 2]  # layers 3, 4 and 5 may still be copying
    assert [e.i for e, _, _ in host_offload._IN_FLIGHT] == [3, 4, 5]  # the finished ones are dropped
    # the three waits are counted for the benchmarks' per-step lines (host work = host time - waits)
    assert 3 * 20_000 <= host_offload.COUNTS["pace_wait_us"] < 3 * 20_000 + 200_000


def test_the_host_runs_further_ahead_while_the_tensors_held_for_copies_are_few(monkeypatch):
    """Past LAYERS_AHEAD the host goes on while the tensors waiting for copies take at most AHEAD_BYTES,
    and never past MAX_LAYERS_AHEAD; copies found finished no longer count as ahead."""
    waited, done = [], set()

    class Event:
        def __init__(self, i):
            self.i = i

        def synchronize(self):
            waited.append(self.i)
            done.add(self.i)

        def query(self):
            return self.i in done

    deque = __import__("collections").deque
    monkeypatch.setattr(host_offload, "LAYERS_AHEAD", 2)
    monkeypatch.setattr(host_offload, "MAX_LAYERS_AHEAD", 4)
    monkeypatch.setattr(host_offload, "AHEAD_BYTES", 100)

    def run(layers, floats):
        waited.clear(), done.clear()
        monkeypatch.setattr(host_offload, "_LAYER_COPIES", deque())
        monkeypatch.setattr(host_offload, "_IN_FLIGHT", deque())
        for i in range(layers):
            host_offload._IN_FLIGHT.append((Event(i), torch.empty(floats), Event(i)))
            host_offload._keep_pace(host_offload._IN_FLIGHT[-1][0])
        return list(waited)

    assert run(3, 8) == []  # 3 layers of 32 bytes: 96 <= 100
    assert run(5, 8) == [0, 1]  # 4 layers hold 128 bytes: back to 3 each time
    assert run(6, 0) == [0, 1]  # nothing held, but at most 4 layers ahead
    waited.clear()
    done.update((2, 3))  # those copies finished meanwhile (in order, as on one stream): 4 and 5 are ahead
    for i in (6, 7, 8):
        host_offload._IN_FLIGHT.append((Event(i), torch.empty(0), Event(i)))
        host_offload._keep_pace(host_offload._IN_FLIGHT[-1][0])
    assert waited == [4]  # 4..7 are four ahead; with 8 the oldest still copying is waited for
    waited.clear()
    host_offload._IN_FLIGHT.append((Event(9), torch.empty(0), Event(9)))
    host_offload._keep_pace(host_offload._IN_FLIGHT[-1][0], far_ahead=False)  # a graphed layer: two ahead
    assert waited == [5, 6, 7]


def test_the_link_backlog_counts_only_copies_whose_tensor_the_gpu_has_produced(monkeypatch):
    """in_flight_bytes counts every copy not finished; link_backlog_bytes only those the link could be
    moving now (the tensor computed), so it does not grow with how far the host runs ahead."""

    class Event:
        def __init__(self, done):
            self.done = done

        def query(self):
            return self.done

    flight = __import__("collections").deque()
    monkeypatch.setattr(host_offload, "_IN_FLIGHT", flight)
    flight.append((Event(True), torch.empty(1), Event(True)))  # copied: dropped
    flight.append((Event(False), torch.empty(2), Event(True)))  # produced, waiting for the link: 8 bytes
    flight.append((Event(False), torch.empty(4), Event(True)))  # 16 bytes
    flight.append((Event(False), torch.empty(8), Event(False)))  # still being computed
    flight.append((Event(False), torch.empty(16), Event(True)))  # after one still computed: not counted
    assert host_offload.link_backlog_bytes() == 24
    assert host_offload.in_flight_bytes() == (2 + 4 + 8 + 16) * 4
    assert len(flight) == 4


def test_the_pool_counts_the_pinned_bytes_it_holds(monkeypatch):
    pool, _ = _fake_pinning(monkeypatch)
    a = pool.take((4, 8), torch.float32)  # pinned inline: 128 bytes, in use
    assert not pool.ready((2, 8), torch.float32, 1)  # one more requested, pinned in the background
    pool.wait_for_pinning()
    assert pool.pinned_bytes() == 128 + 64
    pool.give(a)
    assert pool.pinned_bytes() == 192  # back in the pool: still pinned
    del a
    pool._free.clear()  # a buffer nobody holds any more is freed, and no longer counted
    assert pool.pinned_bytes() == 0


@pytest.mark.gpu
def test_memory_snapshots_show_the_pinned_host_memory_on_gpu():
    from slothnb.memory import snapshot

    before = snapshot().pinned_host
    off = host_offload.OffloadedTensor(torch.randn(3 * 2**20 + 16, device="cuda"))
    assert snapshot().pinned_host >= before + off.nbytes
    off.restore()


@pytest.mark.gpu
def test_the_link_backlog_leaves_out_copies_the_gpu_has_not_produced_on_gpu():
    """An offload queued behind ~100 ms of compute-stream work is in flight at once, but no backlog of
    the link's until the GPU has produced its tensor; once everything has run, neither counts it."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.randn(2**20, device="cuda")
    # pin a buffer of x's size first: pinning host memory may synchronise the device, which would let the
    # copy below finish before the test looks at it
    host_offload.OffloadedTensor(torch.empty_like(x)).restore()
    torch.cuda.synchronize()
    host_offload.release_finished_copies()
    torch.cuda._sleep(200_000_000)  # the compute stream is busy: x's copy waits behind it
    off = host_offload.OffloadedTensor(x)
    assert host_offload.in_flight_bytes() >= x.nbytes
    assert host_offload.link_backlog_bytes() == 0
    torch.cuda.synchronize()
    assert host_offload.link_backlog_bytes() == 0 and host_offload.in_flight_bytes() == 0
    assert torch.equal(off.restore(), x)


@pytest.mark.gpu
@pytest.mark.parametrize("ahead_bytes, far_ahead, host_waits", [(64 << 20, True, False), (0, True, True),
                                                                (64 << 20, False, True)])
def test_the_host_runs_ahead_of_copies_while_few_bytes_wait_for_them_on_gpu(monkeypatch, ahead_bytes,
                                                                            far_ahead, host_waits):
    """Six 1 MiB layer inputs queued behind ~100 ms of compute-stream work: the host queues them all at
    once while the tensors waiting for their copies fit AHEAD_BYTES (MAX_LAYERS_AHEAD 8); else, and for
    a layer replayed as graphs (``far_ahead=False``), it waits for the GPU past two. Values round-trip."""
    import collections
    import time

    monkeypatch.setattr(host_offload, "LAYERS_AHEAD", 2)
    monkeypatch.setattr(host_offload, "MAX_LAYERS_AHEAD", 8)
    monkeypatch.setattr(host_offload, "AHEAD_BYTES", ahead_bytes)
    monkeypatch.setattr(host_offload, "_LAYER_COPIES", collections.deque())
    xs = [torch.full((2**18,), float(i), device="cuda") for i in range(6)]
    for off in [host_offload.OffloadedTensor(torch.empty_like(x)) for x in xs]:  # six buffers pinned first:
        off.restore()  # pinning may synchronise the device
    torch.cuda.synchronize()
    host_offload.release_finished_copies()
    host_offload._LAYER_COPIES.clear()
    torch.cuda._sleep(200_000_000)  # the compute stream is busy: every copy waits behind it
    start = time.perf_counter()
    offs = [host_offload.OffloadedTensor(x, far_ahead=far_ahead) for x in xs]
    queued = time.perf_counter() - start
    assert (queued > 0.03) == host_waits, queued
    for off, x in zip(reversed(offs), reversed(xs)):
        assert torch.equal(off.restore(), x)
