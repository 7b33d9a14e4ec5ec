"""Small shared helpers for the Triton ops (dispatch, block sizes, recompute state, tanh)."""
import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

# Triton's interpreter runs kernels on the CPU; it must be chosen before triton is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

MAX_FUSED_SIZE = 65536  # largest row a single program handles in one block


@triton.jit
def round_fp32_for_bf16(x):
    """Round fp32 to the nearest-even bf16 value (still fp32): Triton's interpreter truncates on the
    fp32 -> bf16 cast where the GPU rounds, so kernels that must match PyTorch's bf16 rounding bit for
    bit on both round themselves."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def tanh(x):
    """tanh from exp(-2|x|), which never overflows: one form for every Triton version and the interpreter
    (the soft-capping of Gemma-2's logits and attention scores)."""
    t = tl.exp(-2.0 * tl.abs(x))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(x >= 0, r, -r)


def _switch(mode) -> str:
    """A ``"0" | "1" | "cpu"`` switch's value; ``--ab-switch`` may set it to the int 0 or 1, a test to a bool."""
    return "1" if mode is True else "0" if mode is False else str(mode)


def switched_on(mode, t: torch.Tensor) -> bool:
    """A ``"0" | "1" | "cpu"`` switch for tensors like t: ``"cpu"`` is on only off CUDA (a path tested in
    the interpreter, or timed on a GPU without a gain)."""
    mode = _switch(mode)
    return mode == "1" or (mode == "cpu" and not t.is_cuda)


def switched_off(mode) -> bool:
    """Whether a ``"0" | "1" | "cpu"`` switch is off for every tensor."""
    return _switch(mode) == "0"


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` should go through the Triton kernel rather than the PyTorch path."""
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids. ``triton.cdiv`` is a Triton function object: calling it from
    Python costs microseconds, and an 8B QLoRA step computes ~1,200 grids."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def row_block(n_cols: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for a kernel that keeps one row of ``n_cols`` in registers."""
    block = next_power_of_2(n_cols)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"row of {n_cols} elements is larger than the fused maximum {MAX_FUSED_SIZE}")
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D ``[rows, last_dim]`` tensor whose columns are unit-stride (a view when possible).

    Row kernels take a row stride, so a slice like ``x[..., :H]`` of a wider buffer needs no copy;
    only a tensor whose last dimension is itself strided is copied.
    """
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def row_programs(device: torch.device, n_rows: int, partials: bool) -> int:
    """How many programs a row loop (a norm's backward) should launch over ``n_rows`` rows.

    Without a per-program partial reduction (a frozen norm weight, the LoRA case: no dW) one
    program per row, as the forward: thousands of programs keep every SM's memory pipe full. With
    one (dW/dB partial rows, summed afterwards) about 16 rows a program, between 1 and 8 programs
    per SM: several resident programs per SM hide each other's load latency (one program per SM
    walking ~60 rows serially is latency-bound), while the fp32 partial rows stay a few % of the
    traffic. In the CPU interpreter every program instance costs ~1 ms, so at most 4 there.
    """
    if device.type != "cuda":
        return max(1, min(n_rows, 4))
    if not partials:
        return max(1, n_rows)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(n_rows, max(sms, min(8 * sms, -(-n_rows // 16)))))


def row_split(device: torch.device, n_rows: int, partials: bool, programs: int | None = None) -> tuple[int, int]:
    """(programs, rows a program) for a norm's backward: :func:`row_programs` (or ``programs``, the
    tests' override), then trimmed so that no program is left without rows."""
    if not n_rows:
        return 1, 1
    per_program = -(-n_rows // (programs or row_programs(device, n_rows, partials)))
    return -(-n_rows // per_program), per_program


class RecomputeState:
    """The RNG and autocast state of a forward, replayed when a backward recomputes it, so the
    recompute draws the same dropout masks and runs in the same dtypes (as torch's checkpoint does).

    The RNG states are read and written on the generators themselves (the CPU one and each CUDA
    device's default), as ``torch.random.fork_rng`` and ``torch.cuda.get/set_rng_state`` do underneath,
    without their per-call Python: a checkpointed layer's recompute sits on the host-bound path of a
    training step, and it saves and restores these states once per layer."""

    def __init__(self, tensors, preserve_rng: bool = True):
        self.autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cuda", "cpu") if torch.is_autocast_enabled(d)]
        self.devices = sorted({t.device.index if t.device.index is not None else torch.cuda.current_device()
                               for t in tensors if t.is_cuda})
        self.generators = [torch.default_generator, *(torch.cuda.default_generators[d] for d in self.devices)]
        self.rng = [g.get_state() for g in self.generators] if preserve_rng else None

    @contextlib.contextmanager
    def replay(self):
        """Grad on, the forward's autocast, and (when preserved) its RNG state, restored afterwards."""
        with contextlib.ExitStack() as stack:
            if self.rng is not None:
                now = [g.get_state() for g in self.generators]
                for g, state in zip(self.generators, self.rng):
                    g.set_state(state)
                stack.callback(_set_states, self.generators, now)
            stack.enter_context(torch.enable_grad())
            for device_type, dtype in self.autocast:
                stack.enter_context(torch.autocast(device_type, dtype=dtype))
            yield


def _set_states(generators, states):
    for g, state in zip(generators, states):
        g.set_state(state)


# ------------------------------------------------------------------------------- launching
# Triton's ``kernel[grid](...)`` binds and specialises every argument in Python on every call (tens of
# microseconds). A Llama-3.1-8B QLoRA step launches ~1,000 Triton kernels, and at 4,096 tokens a
# step its host thread, not the GPU, set the pace. ``fast_launch`` keeps the compiled kernel of each
# specialisation and launches it directly. SLOTHNB_FAST_LAUNCH=0 turns it off.
FAST_LAUNCH = os.environ.get("SLOTHNB_FAST_LAUNCH", "1") != "0"


def _specialisation(value):
    """What Triton specialises a launch argument on: a tensor's dtype and 16-byte alignment; an
    integer's being 1, a multiple of 16, and its width; a float nothing (fp32 by value at launch);
    anything else (constexprs, None) by value."""
    kind = type(value)
    if kind is int:  # the common cases first, by exact type: this runs for every argument of every launch
        return value == 1, value % 16 == 0, -2**31 <= value < 2**31, value < 2**63
    if kind is torch.Tensor or isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if kind is float:
        return float
    if kind is bool or not isinstance(value, int):
        return value
    return value == 1, value % 16 == 0, -2**31 <= value < 2**31, value < 2**63


# The current stream as the raw handle Triton launches on (what Triton's own driver asks torch for);
# ``torch.cuda.current_stream(d).cuda_stream`` builds a Stream object first (~4 us a launch on the H100 hosts).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda device: torch.cuda.current_stream(device).cuda_stream)
# The current device index without ``torch.cuda.current_device``'s Python (its lazy-init check: a
# launch only ever happens on an initialised device).
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device

try:
    from triton import knobs as _knobs
    _RUNTIME = _knobs.runtime
except ImportError:  # an older Triton: no launch hooks to honour through this path
    _RUNTIME = None


def _launch_hooks_quiet() -> bool:
    """No launch hook is registered with Triton (a profiler such as proton registers one): then a
    launch may skip the Python that would call it."""
    if _RUNTIME is None:
        return False
    for hook in (_RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):  # an empty HookChain is quiet
            return False
    return True


# Triton's CudaLauncher (3.5-3.6) calls its C ``launch`` as
#   launch(gridX, gridY, gridZ, stream, function, cooperative, pdl, global_scratch, profile_scratch,
#          packed_metadata, launch_metadata, enter_hook, exit_hook, *args)
# after ~10 us of Python on the H100 hosts: the runner closure, launch metadata, scratch allocation and
# two empty hook chains. A launcher laid out this way whose kernel needs no scratch memory is called
# directly; any other layout (other Triton versions) goes through ``compiled[grid]``.
_LAUNCHER_CALL = ("self", "gridX", "gridY", "gridZ", "stream", "function", "args")


def _direct_launch(compiled):
    """``(launch, function, cooperative, pdl, packed_metadata)`` to call Triton's C launcher of
    ``compiled`` with, or None when its launcher is not the layout above (or needs scratch memory)."""
    import inspect

    try:
        compiled._init_handles()
        launcher = getattr(compiled, "_run", None) or compiled.run
        names = tuple(inspect.signature(type(launcher).__call__).parameters)
        if names != _LAUNCHER_CALL or launcher.global_scratch_size or launcher.profile_scratch_size:
            return None
        return (launcher.launch, compiled.function, launcher.launch_cooperative_grid, launcher.launch_pdl,
                compiled.packed_metadata)
    except Exception:  # anything unexpected: the regular path
        return None


class FastLaunch:
    """A ``@triton.jit`` kernel launched as ``kernel[grid](*args, **kwargs)``, as usual.

    The first launch of each specialisation goes through Triton (which compiles it and returns the
    compiled kernel); later ones call that compiled kernel on the current stream, skipping Triton's
    argument binding, and where Triton's launcher is laid out as ``_direct_launch`` knows, its C
    launch function itself. Keyword arguments that are kernel parameters are passed in their
    positional place; the others (``num_warps``, ``enable_fp_fusion`` ...) are compile options and
    part of the key. The interpreter (CPU), a callable grid, an omitted defaulted parameter and
    ``FAST_LAUNCH = False`` always go through Triton.
    """

    def __init__(self, fn):
        self.fn = fn
        params = getattr(fn, "params", None) or ()  # the interpreter's functions have none: never fast
        self.arg_names = tuple(getattr(fn, "arg_names", ()))
        self._names = frozenset(self.arg_names)
        self._constexpr = tuple(bool(p.is_constexpr) for p in params)  # these are keyed by value
        self.compiled: dict = {}  # key -> (compiled kernel, _direct_launch of it or None)
        self.__doc__ = getattr(getattr(fn, "fn", fn), "__doc__", None)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def _keyed(self, args, kwargs):
        """(key, params, device) of a launch taken by the fast path, or None where Triton must take it."""
        params = args
        options = ()
        if kwargs:
            try:
                params = args + tuple(kwargs[n] for n in self.arg_names[len(args):])
            except KeyError:
                return None
            options = tuple((k, v) for k, v in kwargs.items() if k not in self._names)
        device = _current_device()
        spec = _specialisation
        return (tuple([v if c else spec(v) for v, c in zip(params, self._constexpr)]), options, device), params, device

    def _fast(self, grid) -> bool:
        return not (INTERPRET or not FAST_LAUNCH or callable(grid) or len(self._constexpr) != len(self.arg_names))

    def launch(self, grid, args, kwargs):
        keyed = self._keyed(args, kwargs) if self._fast(grid) else None
        if keyed is None:
            return self.fn[grid](*args, **kwargs)
        key, params, device = keyed
        entry = self.compiled.get(key)
        if entry is None:
            compiled = self.fn[grid](*args, **kwargs)
            if compiled is not None:
                self.compiled[key] = (compiled, _direct_launch(compiled))
            return compiled
        compiled, direct = entry
        g0, g1, g2 = _grid3(grid)
        try:
            if direct is not None and _launch_hooks_quiet():
                launch, function, cooperative, pdl, metadata = direct
                launch(g0, g1, g2, _raw_stream(device), function, cooperative, pdl, None, None, metadata,
                       None, None, None, *params)
            else:
                compiled[(g0, g1, g2)](*params, stream=_raw_stream(device))
        except (TypeError, AttributeError):  # a Triton whose compiled kernels launch differently
            _switch_off_fast_launch()
            return self.fn[grid](*args, **kwargs)
        return compiled

    def bind(self, grid, args, kwargs, slots):
        """Launch as ``kernel[grid](*args, **kwargs)`` and return a ``BoundLaunch`` of that launch whose
        parameters at positions ``slots`` (in the kernel's signature order) are given at each call, or
        None where the launch cannot be bound (not the fast path, or no C launcher to call)."""
        self.launch(grid, args, kwargs)
        keyed = self._keyed(args, kwargs) if self._fast(grid) else None
        if keyed is None:
            return None
        key, params, device = keyed
        entry = self.compiled.get(key)
        if entry is None or entry[1] is None:
            return None
        return BoundLaunch(entry[1], params, slots, device, _grid3(grid))


def _grid3(grid):
    """A launch grid as its three dimensions."""
    n = len(grid)
    return grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1


class BoundLaunch:
    """One compiled launch of a ``FastLaunch`` kernel, grid and parameters fixed but those at ``slots``,
    called in C with no key built: for a call site that launches the same work again and again on fresh
    buffers (``dequantize_nf4``, ~480 launches an 8B QLoRA step, where building the key and checking the
    call's arguments cost ~10 us of host each). Whoever calls it promises that the values it passes
    specialise as the bound ones did (dtype, 16-byte alignment) and fit the fixed parameters."""

    __slots__ = ("direct", "params", "slots", "device", "grid")

    def __init__(self, direct, params, slots, device, grid):
        self.direct, self.slots, self.device, self.grid = direct, tuple(slots), device, grid
        self.params = list(params)
        for i in self.slots:  # the bound call's own buffers are not kept alive
            self.params[i] = None

    def __call__(self, *values) -> bool:
        """Launch with ``values`` at the slots, on the current stream; False, with nothing launched, where
        the fast path is off, a launch hook is registered (a profiler must see the launch) or the
        current device is another."""
        if not FAST_LAUNCH or _current_device() != self.device or not _launch_hooks_quiet():
            return False
        params = self.params.copy()
        for i, v in zip(self.slots, values):
            params[i] = v
        launch, function, cooperative, pdl, metadata = self.direct
        g0, g1, g2 = self.grid
        launch(g0, g1, g2, _raw_stream(self.device), function, cooperative, pdl, None, None, metadata,
               None, None, None, *params)
        return True


def _switch_off_fast_launch():
    global FAST_LAUNCH
    FAST_LAUNCH = False


def fast_launch(fn) -> FastLaunch:
    """Decorator (above ``@triton.jit``) for kernels launched from Python: see ``FastLaunch``."""
    return FastLaunch(fn)
