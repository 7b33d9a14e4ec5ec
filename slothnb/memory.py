"""The memory stage recorder: what each stage of a run (load, LoRA, train, generate) cost.

Engine code calls ``record_stage("loaded model")``; the CLI prints ``memory_table()`` and the notebook
panels render ``RECORDER.to_rows()``. Three views of GPU memory are kept because they disagree, and the
disagreement is what people ask about:

- ``allocated``: bytes in live tensors (what the model and activations really use);
- ``reserved``: bytes the PyTorch caching allocator holds (allocated + cached free blocks);
- ``nvml_used``: what ``nvidia-smi`` shows for the whole GPU. ``gap = nvml_used - reserved`` is the CUDA
  context, cuBLAS/Triton workspaces and other processes, memory PyTorch does not see.

Beside them, ``pinned_host``: the page-locked host memory slothnb's offloaded checkpointing holds
(layer inputs and carried values between forward and backward, and its buffer pool): part of
``cpu_rss`` that the OS can never swap out.

Without a GPU every GPU field is None and ``has_gpu`` is False. nvidia-ml-py (``pynvml``) is optional:
without it the NVML fields are None.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

GIB = 1024**3


@dataclass
class MemorySnapshot:
    """Memory of this process at one instant. Byte counts; None where not measurable here."""

    time: float
    has_gpu: bool
    device: str | None = None  # GPU name, e.g. "NVIDIA H100 80GB HBM3"
    device_index: int | None = None
    allocated: int | None = None
    reserved: int | None = None
    peak_allocated: int | None = None  # since the last peak reset
    peak_reserved: int | None = None
    nvml_used: int | None = None  # for the torch device, as nvidia-smi shows it
    nvml_total: int | None = None
    gap: int | None = None  # nvml_used - reserved: CUDA context, workspaces, other processes
    nvml_per_gpu: list[dict] = field(default_factory=list)  # [{index, name, used, total}] every visible GPU
    pinned_host: int | None = None  # page-locked host memory of the offloaded checkpoints
    cpu_rss: int | None = None


@dataclass
class StageRecord:
    """One recorded stage: its snapshot and the peaks reached since the previous stage."""

    stage: str
    snapshot: MemorySnapshot
    peak_allocated: int | None  # max allocated between the previous record and this one
    peak_reserved: int | None


_nvml_state = {"ready": None}


def _nvml():
    """The pynvml module, initialised once; None when nvidia-ml-py or the driver is missing."""
    if _nvml_state["ready"] is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml_state["ready"] = pynvml
        except Exception:  # no package, no driver, no GPU: NVML is simply unavailable
            _nvml_state["ready"] = False
    return _nvml_state["ready"] or None


def _nvml_handle(nvml, torch_index: int):
    """NVML handle of torch's device ``torch_index``; matched by UUID because CUDA_VISIBLE_DEVICES
    renumbers devices for torch but not for NVML."""
    try:
        uuid = str(torch.cuda.get_device_properties(torch_index).uuid)
        return nvml.nvmlDeviceGetHandleByUUID("GPU-" + uuid if not uuid.startswith("GPU-") else uuid)
    except Exception:
        return nvml.nvmlDeviceGetHandleByIndex(torch_index)


def _nvml_all(nvml) -> list[dict]:
    rows = []
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        info = nvml.nvmlDeviceGetMemoryInfo(h)
        name = nvml.nvmlDeviceGetName(h)
        rows.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                     "used": int(info.used), "total": int(info.total)})
    return rows


def _cpu_rss() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return None


def _cuda_index(device) -> int | None:
    if not torch.cuda.is_available():
        return None
    if device is None:
        return torch.cuda.current_device()
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _reset_peaks(index: int) -> None:
    from slothnb.models import graph_capture

    torch.cuda.reset_peak_memory_stats(index)
    graph_capture.peak_before_capture(reset=True)
    graph_capture.replay_peak(reset=True)


def snapshot(device=None) -> MemorySnapshot:
    """Memory now, for ``device`` (default: the current CUDA device, if any)."""
    snap = MemorySnapshot(time=time.time(), has_gpu=False, cpu_rss=_cpu_rss())
    index = _cuda_index(device)
    if index is None:
        return snap
    snap.has_gpu = True
    snap.device_index = index
    snap.device = torch.cuda.get_device_name(index)
    snap.allocated = torch.cuda.memory_allocated(index)
    snap.reserved = torch.cuda.memory_reserved(index)
    from slothnb.models import graph_capture, host_offload  # engine level: they own their memory

    # CUDA graphs: a capture restarts the peak counter, and a replay's temporaries are not counted in it
    snap.peak_allocated = max(torch.cuda.max_memory_allocated(index), graph_capture.peak_before_capture(),
                              graph_capture.replay_peak())
    snap.peak_reserved = torch.cuda.max_memory_reserved(index)

    snap.pinned_host = host_offload.pinned_bytes()
    nvml = _nvml()
    if nvml is not None:
        try:
            info = nvml.nvmlDeviceGetMemoryInfo(_nvml_handle(nvml, index))
            snap.nvml_used, snap.nvml_total = int(info.used), int(info.total)
            snap.gap = snap.nvml_used - snap.reserved
            snap.nvml_per_gpu = _nvml_all(nvml)
        except Exception:  # an NVML error must never break training
            pass
    return snap


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


_COLUMNS = [  # (header, row key)
    ("stage", "stage"),
    ("alloc GiB", "allocated"),
    ("reserved GiB", "reserved"),
    ("peak alloc GiB", "peak_allocated"),
    ("peak resv GiB", "peak_reserved"),
    ("nvml used GiB", "nvml_used"),
    ("gap GiB", "gap"),
    ("pinned GiB", "pinned_host"),
    ("cpu rss GiB", "cpu_rss"),
]


class MemoryRecorder:
    """Records named stages in order. ``record`` resets the CUDA peak counters (by default) so each
    stage's peak is the peak reached since the previous stage."""

    def __init__(self, device=None):
        self.device = device
        self.stages: list[StageRecord] = []

    def record(self, stage: str, reset_peak: bool = True) -> StageRecord:
        snap = snapshot(self.device)
        rec = StageRecord(stage=str(stage), snapshot=snap,
                          peak_allocated=snap.peak_allocated, peak_reserved=snap.peak_reserved)
        if reset_peak and snap.has_gpu:
            _reset_peaks(snap.device_index)
        self.stages.append(rec)
        return rec

    def reset(self) -> None:
        """Forget every stage and restart the peak counters."""
        self.stages.clear()
        index = _cuda_index(self.device)
        if index is not None:
            _reset_peaks(index)

    def to_rows(self) -> list[dict]:
        """One flat dict per stage (byte counts), for tables and plots."""
        rows = []
        for rec in self.stages:
            s = rec.snapshot
            rows.append({
                "stage": rec.stage, "time": s.time, "has_gpu": s.has_gpu, "device": s.device,
                "allocated": s.allocated, "reserved": s.reserved,
                "peak_allocated": rec.peak_allocated, "peak_reserved": rec.peak_reserved,
                "nvml_used": s.nvml_used, "nvml_total": s.nvml_total, "gap": s.gap,
                "pinned_host": s.pinned_host, "cpu_rss": s.cpu_rss,
            })
        return rows

    def format_table(self) -> str:
        """Plain-text table, GiB with 2 decimals, '-' where a value is not measurable."""
        body = [[row["stage"]] + [_gib(row[key]) for _, key in _COLUMNS[1:]] for row in self.to_rows()]
        header = [h for h, _ in _COLUMNS]
        widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

        def line(cells):
            first = cells[0].ljust(widths[0])
            return "  ".join([first] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]).rstrip()

        out = [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in body]
        return "\n".join(out)

    def as_dict(self) -> dict:
        return {"stages": [{"stage": r.stage, "snapshot": asdict(r.snapshot),
                            "peak_allocated": r.peak_allocated, "peak_reserved": r.peak_reserved}
                           for r in self.stages]}


RECORDER = MemoryRecorder()  # the process-wide recorder the engine writes to


def record_stage(name: str, reset_peak: bool = True) -> StageRecord:
    """Record a stage on the process-wide recorder (what loader, LoRA, trainer and generation call)."""
    return RECORDER.record(name, reset_peak=reset_peak)


def memory_table() -> str:
    return RECORDER.format_table()
