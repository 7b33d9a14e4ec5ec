"""What the GPU and its host link did during a benchmark: clocks, power, throttling, the PCIe link.

Why: the same code on H100s of one kind ran the 8B QLoRA 2,048-token step in 317 ms on one machine and
336-358 ms on another, with the host done queueing at 285-306 ms (session 19, call 12): the GPU set the
pace, and nothing recorded said why. A GPU held back by its power or thermal limit, or a PCIe link that
trained narrower or slower (the offloaded checkpoints move ~5.5 GB each way a step at 2,048 tokens), reads
the same from the step times alone. This records, per step, what NVML counts (energy, time held back by
power and by temperature, the SM clock when the step ends) and, once per run, the link as trained and as
measured by pinned copies.

Everything here returns None fields, never raises, where NVML (nvidia-ml-py) or CUDA is missing.
"""
import time

# NVML's perf policies (nvml.h: nvmlPerfPolicyType_t): cumulative ns the clocks were held back by each.
_POLICIES = {"power": 0, "thermal": 1}
_CLOCK_SM = 1  # nvml.h: NVML_CLOCK_SM


def _nvml_and_handle(device_index: int = 0):
    """(pynvml, handle) of torch's device ``device_index``, or (None, None)."""
    from slothnb.memory import _nvml, _nvml_handle

    nvml = _nvml()
    if nvml is None:
        return None, None
    try:
        return nvml, _nvml_handle(nvml, device_index)
    except Exception:
        return None, None


def _call(fn, *args):
    try:
        return fn(*args)
    except Exception:  # a counter this GPU or driver does not have
        return None


def link_info(nvml, handle) -> dict:
    """The PCIe link as trained now and at best: an H100 SXM's is generation 5, width 16."""
    if nvml is None:
        return {}
    return {"pcie_gen": _call(nvml.nvmlDeviceGetCurrPcieLinkGeneration, handle),
            "pcie_width": _call(nvml.nvmlDeviceGetCurrPcieLinkWidth, handle),
            "pcie_gen_max": _call(nvml.nvmlDeviceGetMaxPcieLinkGeneration, handle),
            "pcie_width_max": _call(nvml.nvmlDeviceGetMaxPcieLinkWidth, handle)}


def copy_bandwidth(torch, mib: int = 256, repeats: int = 3) -> dict:
    """GB/s of one ``mib`` MiB copy between pinned host memory and the GPU, each way (best of
    ``repeats``, timed by CUDA events): what the offloaded checkpoints' side stream can move."""
    if not torch.cuda.is_available():
        return {}
    n = mib << 20
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = {}
    for name, dst, src in (("h2d_gbps", dev, host), ("d2h_gbps", host, dev)):
        best = None
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
            best = ms if best is None else min(best, ms)
        out[name] = round(n / (best * 1e-3) / 1e9, 1)
    return out


class StepTelemetry:
    """Per step: ``begin()`` before it, ``end()`` after its synchronisation -> one dict.

    ``power_w``: mean board power over the step (energy counter); ``power_capped_ms`` and
    ``thermal_capped_ms``: how long the clocks were held back by the power or thermal limit during it;
    ``sm_mhz``: the SM clock as the step ends; ``temp_c``: the GPU's temperature then.
    """

    def __init__(self, nvml=None, handle=None):
        self.nvml, self.handle = nvml, handle
        self._start = None

    @classmethod
    def for_device(cls, device_index: int = 0) -> "StepTelemetry":
        return cls(*_nvml_and_handle(device_index))

    def _read(self) -> dict:
        n, h = self.nvml, self.handle
        out = {"t": time.perf_counter(), "energy_mj": _call(n.nvmlDeviceGetTotalEnergyConsumption, h)}
        for name, policy in _POLICIES.items():
            v = _call(n.nvmlDeviceGetViolationStatus, h, policy)
            out[name] = getattr(v, "violationTime", None)
        return out

    def begin(self) -> None:
        self._start = self._read() if self.nvml is not None else None

    def end(self) -> dict:
        if self.nvml is None or self._start is None:
            return {}
        a, b, n, h = self._start, self._read(), self.nvml, self.handle
        dt = b["t"] - a["t"]
        rec = {"sm_mhz": _call(n.nvmlDeviceGetClockInfo, h, _CLOCK_SM),
               "temp_c": _call(n.nvmlDeviceGetTemperature, h, 0),  # NVML_TEMPERATURE_GPU
               "power_w": (round((b["energy_mj"] - a["energy_mj"]) / 1e3 / dt, 1)
                           if a["energy_mj"] is not None and b["energy_mj"] is not None and dt > 0 else None)}
        for name in _POLICIES:
            rec[f"{name}_capped_ms"] = (round((b[name] - a[name]) / 1e6, 2)
                                        if a[name] is not None and b[name] is not None else None)
        return rec


def summary(steps: list[dict]) -> dict:
    """Over the timed steps: the lowest and median SM clock, the highest mean power, the time capped."""
    def values(key):
        return sorted(s[key] for s in steps if s.get(key) is not None)

    out = {}
    clocks, power = values("sm_mhz"), values("power_w")
    if clocks:
        out.update(sm_mhz_min=clocks[0], sm_mhz_median=clocks[len(clocks) // 2])
    if power:
        out["power_w_max"] = power[-1]
    for name in _POLICIES:
        capped = values(f"{name}_capped_ms")
        if capped:
            out[f"{name}_capped_ms_total"] = round(sum(capped), 1)
    return out
