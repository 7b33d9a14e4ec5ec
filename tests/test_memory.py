"""The stage recorder: stages in order, fields filled, table matching the rows."""
import subprocess
import sys

import pytest
import torch

from slothnb import memory
from slothnb.memory import GIB, MemoryRecorder, snapshot


def test_cpu_snapshot_has_no_gpu_fields():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    s = snapshot()
    assert s.has_gpu is False
    assert s.device is None
    for name in ("allocated", "reserved", "peak_allocated", "peak_reserved", "nvml_used", "nvml_total", "gap"):
        assert getattr(s, name) is None, name
    assert s.cpu_rss is not None and s.cpu_rss > 10 * 2**20  # a python process with torch loaded


def test_cpu_rss_follows_a_real_allocation():
    # In a fresh process: in this one, memory freed by earlier tests may still be resident and be
    # handed out again, so a new allocation would not move the RSS.
    code = (
        "import torch\n"
        "from slothnb.memory import snapshot\n"
        "before = snapshot().cpu_rss\n"
        "block = torch.ones(16 * 2**20)  # 64 MiB, every page touched\n"
        "print(snapshot().cpu_rss - before)\n"
    )
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               timeout=120).stdout.split()[-1])
    assert grown > 48 * 2**20


def test_stages_recorded_in_order_with_rows_and_dict():
    rec = MemoryRecorder()
    names = ["load", "lora", "train step 1", "generate"]
    returned = [rec.record(n) for n in names]
    assert [r.stage for r in rec.stages] == names
    assert returned == rec.stages
    times = [r.snapshot.time for r in rec.stages]
    assert times == sorted(times)
    rows = rec.to_rows()
    assert [r["stage"] for r in rows] == names
    for row in rows:
        assert set(row) >= {"stage", "allocated", "reserved", "peak_allocated", "peak_reserved",
                            "nvml_used", "nvml_total", "gap", "pinned_host", "cpu_rss", "has_gpu", "device"}
        assert row["has_gpu"] == torch.cuda.is_available()
    d = rec.as_dict()
    assert [s["stage"] for s in d["stages"]] == names
    assert d["stages"][0]["snapshot"]["cpu_rss"] == rows[0]["cpu_rss"]
    rec.reset()
    assert rec.stages == [] and rec.to_rows() == []


def test_format_table_prints_gib_with_two_decimals():
    rec = MemoryRecorder()
    rec.record("loaded model")
    rec.record("x")
    lines = rec.format_table().splitlines()
    assert lines[0].split()[0] == "stage" and "cpu rss GiB" in lines[0]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert len(lines) == 4
    row = lines[2]
    assert row.startswith("loaded model")
    cells = row[len("loaded model"):].split()
    assert len(cells) == 8
    expected_rss = rec.to_rows()[0]["cpu_rss"] / GIB
    assert cells[-1] == f"{expected_rss:.2f}"
    if not torch.cuda.is_available():
        assert cells[:-1] == ["-"] * 7
    # all rows have the same column layout (right-aligned numbers end at the same column)
    assert len(lines[2]) == len(lines[3]) == len(lines[0])


def test_process_wide_recorder():
    memory.RECORDER.reset()
    memory.record_stage("a")
    memory.record_stage("b")
    assert [r.stage for r in memory.RECORDER.stages] == ["a", "b"]
    table = memory.memory_table()
    assert table.splitlines()[2].startswith("a") and table.splitlines()[3].startswith("b")
    memory.RECORDER.reset()


@pytest.mark.gpu
def test_gpu_snapshot_and_stage_peaks():
    torch.cuda.synchronize()
    rec = MemoryRecorder()
    rec.record("start")
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB
    del x
    second = rec.record("after a 256 MiB temporary")
    third = rec.record("idle")
    s = second.snapshot
    assert s.has_gpu and s.device and s.device_index is not None
    assert s.allocated is not None and s.reserved >= s.allocated
    assert second.peak_allocated >= 256 * 2**20  # the temporary shows in this stage's peak...
    assert third.peak_allocated < second.peak_allocated  # ...and not in the next one (peak was reset)
    try:
        import pynvml  # noqa: F401
    except ImportError:
        pytest.skip("nvidia-ml-py not installed: NVML fields stay None")
    assert s.nvml_used is not None and s.nvml_total is not None
    assert 0 < s.nvml_used <= s.nvml_total
    assert s.gap == s.nvml_used - s.reserved
    assert s.nvml_per_gpu and all(g["total"] > 0 for g in s.nvml_per_gpu)
