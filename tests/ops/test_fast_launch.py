"""kernels._utils.FastLaunch: a compiled specialisation is launched directly, never for another one.

On CPU the launch goes through a stand-in for a Triton JIT function (the interpreter never takes the
fast path); on the GPU real kernels must give the same bits with the fast path on and off.
"""
import pytest
import torch

from slothnb.kernels import _utils


class FakeCompiled:
    def __init__(self, launches):
        self.launches = launches

    def __getitem__(self, grid):
        return lambda *params, stream=None: self.launches.append(("direct", grid, params, stream))


class FakeJit:
    """Records Triton's own launches; returns a 'compiled kernel' like JITFunction.run does."""
    arg_names = ["X", "n", "eps", "BLOCK"]
    params = [type("P", (), {"is_constexpr": name == "BLOCK"})() for name in arg_names]

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append(("triton", grid, args, kwargs))
            return FakeCompiled(self.launches)
        return run


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(_utils, "INTERPRET", False)
    monkeypatch.setattr(_utils, "FAST_LAUNCH", True)
    monkeypatch.setattr(_utils, "_current_device", lambda: 0)
    monkeypatch.setattr(_utils, "_raw_stream", lambda device: 77)  # the current stream's raw handle
    fake = FakeJit()
    return _utils.fast_launch(fake), fake.launches


def test_the_second_launch_of_a_specialisation_skips_triton(kernel):
    k, launches = kernel
    x = torch.zeros(64)
    k[(4,)](x, 32, 1e-5, BLOCK=128, num_warps=4)
    k[(4,)](x, 48, 1e-6, BLOCK=128, num_warps=4)  # another multiple of 16, another float: same kernel
    assert [l[0] for l in launches] == ["triton", "direct"]
    assert launches[1][1] == (4, 1, 1)  # the grid padded to three dimensions
    assert launches[1][2] == (x, 48, 1e-6, 128) and launches[1][3] == 77  # constexpr in place, current stream


@pytest.mark.parametrize("change", ["alignment", "int_is_one", "int_divisibility", "int_width", "dtype",
                                    "constexpr", "option"])
def test_any_change_triton_specialises_on_goes_back_through_triton(kernel, change):
    k, launches = kernel
    x = torch.zeros(64)
    base = dict(args=(x, 32, 1e-5), kw=dict(BLOCK=128, num_warps=4))
    k[(1,)](*base["args"], **base["kw"])
    args, kw = list(base["args"]), dict(base["kw"])
    if change == "alignment":
        args[0] = x[1:]  # 4 bytes in: not 16-byte aligned
    elif change == "int_is_one":
        args[1] = 1
    elif change == "int_divisibility":
        args[1] = 33
    elif change == "int_width":
        args[1] = 2**32
    elif change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float64)
    elif change == "constexpr":
        kw["BLOCK"] = 256
    else:
        kw["num_warps"] = 8
    k[(1,)](*args, **kw)
    assert [l[0] for l in launches] == ["triton", "triton"]


def test_interpreter_callable_grid_and_switch_off_always_use_triton(kernel, monkeypatch):
    k, launches = kernel
    x = torch.zeros(64)
    for _ in range(2):
        k[lambda meta: (1,)](x, 32, 1e-5, BLOCK=128)
    monkeypatch.setattr(_utils, "FAST_LAUNCH", False)
    k[(1,)](x, 32, 1e-5, BLOCK=128)
    k[(1,)](x, 32, 1e-5, BLOCK=128)
    assert [l[0] for l in launches] == ["triton"] * 4


@pytest.mark.gpu
def test_fast_and_triton_launches_give_the_same_bits_on_gpu(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from slothnb.kernels.rms_norm import rms_norm
    from slothnb.kernels.swiglu import swiglu

    torch.manual_seed(0)
    buf = torch.randn(64 * 4096 + 8, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)

    def run():
        outs = []
        for offset in (0, 8, 3):  # aligned, aligned, 6 bytes off
            x = buf[offset:offset + 64 * 4096].view(64, 4096)
            outs.append(rms_norm(x, w, 1e-6))
            outs.append(swiglu(x[:, :2048], x[:, 2048:]))
        return outs

    monkeypatch.setattr(_utils, "FAST_LAUNCH", False)
    expected = run()
    monkeypatch.setattr(_utils, "FAST_LAUNCH", True)
    run()  # compiles / records each specialisation
    got = run()  # launched directly
    from slothnb.kernels.rms_norm import _rms_norm_fwd
    import triton
    if triton.__version__.startswith(("3.5", "3.6")):  # the GPU image's Triton: its C launcher, called directly
        assert all(direct is not None for _, direct in _rms_norm_fwd.compiled.values())
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    side = torch.cuda.Stream()  # launched on the current stream's raw handle, whichever stream that is
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = run()
    side.synchronize()
    for e, g in zip(expected, on_side):
        assert torch.equal(e, g)


class FakeLauncher:
    """Triton 3.5-3.6's CudaLauncher layout: a C ``launch`` behind a Python ``__call__``."""
    global_scratch_size = profile_scratch_size = 0
    launch_cooperative_grid, launch_pdl = False, True

    def __init__(self, launches):
        self.launch = lambda *a: launches.append(("c", a))

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        raise AssertionError("the direct path calls launch itself")


class FakeCompiledWithLauncher(FakeCompiled):
    function, packed_metadata = 1234, (4, 1, 0)

    def __init__(self, launches):
        super().__init__(launches)
        self._run = FakeLauncher(launches)

    def _init_handles(self):
        pass


class Hooks:
    def __init__(self, calls):
        self.calls = calls


@pytest.fixture
def c_kernel(kernel, monkeypatch):
    k, launches = kernel
    k.fn.__class__ = type("FakeJitC", (FakeJit,), {"__getitem__": lambda self, grid: (
        lambda *a, **kw: (self.launches.append(("triton", grid, a, kw)), FakeCompiledWithLauncher(self.launches))[1])})
    runtime = type("Runtime", (), {})()
    runtime.launch_enter_hook, runtime.launch_exit_hook = Hooks([]), Hooks([])
    monkeypatch.setattr(_utils, "_RUNTIME", runtime)
    return k, launches, runtime


def test_a_launcher_of_the_known_layout_is_called_in_c_directly(c_kernel):
    k, launches, _ = c_kernel
    x = torch.zeros(64)
    k[(4, 2)](x, 32, 1e-5, BLOCK=128)
    k[(4, 2)](x, 48, 1e-6, BLOCK=128)
    assert [l[0] for l in launches] == ["triton", "c"]
    # grid, stream, function, cooperative, pdl, no scratch, metadata, no launch metadata, no hooks, params
    assert launches[1][1] == (4, 2, 1, 77, 1234, False, True, None, None, (4, 1, 0), None, None, None,
                              x, 48, 1e-6, 128)


@pytest.mark.parametrize("why", ["hook", "plain_hook", "scratch", "layout"])
def test_hooks_scratch_or_another_layout_keep_tritons_own_launch(c_kernel, why, monkeypatch):
    k, launches, runtime = c_kernel
    x = torch.zeros(64)
    if why == "hook":  # a profiler's hook must still see every launch
        runtime.launch_exit_hook = Hooks([print])
    elif why == "plain_hook":
        runtime.launch_enter_hook = print
    elif why == "scratch":
        monkeypatch.setattr(FakeLauncher, "global_scratch_size", 128)
    else:
        monkeypatch.setattr(FakeLauncher, "__call__", lambda self, gridX, gridY, gridZ, stream, function,
                            kernel_metadata, *args: None)
    k[(4,)](x, 32, 1e-5, BLOCK=128)
    k[(4,)](x, 32, 1e-5, BLOCK=128)
    assert [l[0] for l in launches] == ["triton", "direct"]


def test_a_compiled_kernel_that_launches_differently_switches_the_fast_path_off(kernel, monkeypatch):
    k, launches = kernel
    x = torch.zeros(64)
    k[(1,)](x, 32, 1e-5, BLOCK=128)
    monkeypatch.setattr(FakeCompiled, "__getitem__", lambda self, grid: (lambda *a: None))  # no stream= keyword
    k[(1,)](x, 32, 1e-5, BLOCK=128)
    assert _utils.FAST_LAUNCH is False and [l[0] for l in launches] == ["triton", "triton"]


def test_a_bound_launch_calls_the_c_launcher_with_new_values_at_its_slots(c_kernel):
    k, launches, _ = c_kernel
    x, y = torch.zeros(64), torch.ones(64)
    k[(4, 2)](x, 32, 1e-5, BLOCK=128)  # compiled
    bound = k.bind((4, 2), (x, 32, 1e-5), {"BLOCK": 128}, slots=(0,))
    assert bound.params[0] is None  # the binding call's buffer is not kept alive
    assert bound(y) is True
    assert [l[0] for l in launches] == ["triton", "c", "c"]  # bind launched once itself, then the bound call
    assert launches[2][1] == (4, 2, 1, 77, 1234, False, True, None, None, (4, 1, 0), None, None, None,
                              y, 32, 1e-5, 128)


def test_a_bound_launch_declines_under_hooks_or_another_device_and_binds_only_c_launchers(c_kernel, kernel,
                                                                                          monkeypatch):
    k, launches, runtime = c_kernel
    x = torch.zeros(64)
    k[(4,)](x, 32, 1e-5, BLOCK=128)
    bound = k.bind((4,), (x, 32, 1e-5), {"BLOCK": 128}, slots=(0,))
    del launches[:]
    runtime.launch_enter_hook = Hooks([print])  # a profiler's hook: the regular launch must run
    assert bound(x) is False
    runtime.launch_enter_hook = Hooks([])
    monkeypatch.setattr(_utils, "_current_device", lambda: 1)
    assert bound(x) is False
    monkeypatch.setattr(_utils, "_current_device", lambda: 0)
    monkeypatch.setattr(_utils, "FAST_LAUNCH", False)
    assert bound(x) is False and launches == []
    monkeypatch.setattr(_utils, "FAST_LAUNCH", True)
    monkeypatch.setattr(FakeLauncher, "global_scratch_size", 128)  # no C launcher to call directly
    plain = _utils.fast_launch(FakeJit())
    plain.fn.__class__ = k.fn.__class__
    plain[(4,)](x, 32, 1e-5, BLOCK=128)
    assert plain.bind((4,), (x, 32, 1e-5), {"BLOCK": 128}, slots=(0,)) is None
