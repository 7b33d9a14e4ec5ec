"""bench/gpu_telemetry.py: per-step GPU counters from NVML and the host link's speed."""
import os
import sys
import time
import types

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import gpu_telemetry  # noqa: E402


class _FakeNvml:
    """NVML's counters as a driver keeps them: energy in mJ, capped time in ns, both cumulative."""

    def __init__(self):
        self.energy, self.capped = 1_000_000, {0: 5_000_000, 1: 0}

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return self.energy

    def nvmlDeviceGetViolationStatus(self, h, policy):
        return types.SimpleNamespace(referenceTime=0, violationTime=self.capped[policy])

    def nvmlDeviceGetClockInfo(self, h, clock):
        assert clock == 1  # the SM clock
        return 1755

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 61

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h):
        return 5

    def nvmlDeviceGetCurrPcieLinkWidth(self, h):
        return 16

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    def nvmlDeviceGetMaxPcieLinkWidth(self, h):
        return 16


def test_step_telemetry_turns_cumulative_counters_into_per_step_figures(monkeypatch):
    nvml = _FakeNvml()
    clock = iter([10.0, 10.5])  # the step took 0.5 s
    monkeypatch.setattr(gpu_telemetry.time, "perf_counter", lambda: next(clock))
    tel = gpu_telemetry.StepTelemetry(nvml, "h")
    tel.begin()
    nvml.energy += 350_000  # 350 J in 0.5 s
    nvml.capped[0] += 12_500_000  # 12.5 ms held back by the power limit
    step = tel.end()
    assert step == {"sm_mhz": 1755, "temp_c": 61, "power_w": 700.0, "power_capped_ms": 12.5,
                    "thermal_capped_ms": 0.0}


def test_without_nvml_every_figure_is_left_out():
    tel = gpu_telemetry.StepTelemetry(None, None)
    tel.begin()
    assert tel.end() == {} and gpu_telemetry.link_info(None, None) == {}
    assert gpu_telemetry.summary([{}, {}]) == {}


def test_link_info_keeps_what_the_driver_answers():
    assert gpu_telemetry.link_info(_FakeNvml(), "h") == {"pcie_gen": 5, "pcie_width": 16, "pcie_gen_max": None,
                                                         "pcie_width_max": 16}


def test_summary_over_steps():
    steps = [{"sm_mhz": 1980, "power_w": 600.0, "power_capped_ms": 0.0, "thermal_capped_ms": 0.0},
             {"sm_mhz": 1755, "power_w": 700.0, "power_capped_ms": 40.0, "thermal_capped_ms": 0.0},
             {"sm_mhz": 1980, "power_w": 650.0, "power_capped_ms": 2.5, "thermal_capped_ms": None}]
    assert gpu_telemetry.summary(steps) == {"sm_mhz_min": 1755, "sm_mhz_median": 1980, "power_w_max": 700.0,
                                            "power_capped_ms_total": 42.5, "thermal_capped_ms_total": 0.0}


def test_copy_bandwidth_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the GPU test measures it")
    assert gpu_telemetry.copy_bandwidth(torch) == {}


@pytest.mark.gpu
def test_copy_bandwidth_and_step_counters_on_gpu():
    bw = gpu_telemetry.copy_bandwidth(torch, mib=64, repeats=2)
    assert bw["h2d_gbps"] > 5 and bw["d2h_gbps"] > 5, bw  # any PCIe 3 x16 link or better
    tel = gpu_telemetry.StepTelemetry.for_device(0)
    if tel.nvml is None:
        pytest.skip("nvidia-ml-py is not installed")
    a = torch.randn(4096, 4096, device="cuda")
    tel.begin()
    start = time.perf_counter()
    while time.perf_counter() - start < 0.5:  # long enough for the energy counter to tick (it updates every few ms)
        for _ in range(20):
            a = torch.tanh(a @ a.T / 64)
        torch.cuda.synchronize()
    step = tel.end()
    assert step["sm_mhz"] > 100 and step["power_w"] > 50 and step["power_capped_ms"] >= 0, step


def test_report_shows_the_graphs_temporaries_beside_the_allocator_peak(tmp_path):
    import json

    import report

    base = {"kind": "bench", "system": "slothnb", "model": "1b", "quant": "none", "seq": 2048, "batch": 2,
            "status": "ok", "grad_ckpt": "slothnb", "step_s_median": 0.07, "tokens_per_s": 58000.0,
            "peak_alloc_gib": 2.887, "peak_reserved_gib": 3.357, "losses": [12.166, 12.194, 12.149]}
    rows = [dict(base, graph_pool_gib=0.504, graph_honest_peak_gib=2.964),
            dict(base, graph_pool_gib=0.55),  # a record from before the replays' peak was measured
            dict(base)]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table, _ = report.step_tables(str(path), default_peak=778.0)
    cells = [line.split(" | ")[5] for line in table.splitlines() if line.startswith("| slothnb")]
    assert cells == ["2.89 (2.96 with the graphs' temporaries)", "2.89 + 0.55 graph pool", "2.89"]


def test_report_tabulates_the_ab_slots_of_a_run(tmp_path):
    import json

    import report

    rec = {"kind": "bench", "system": "slothnb", "model": "8b", "quant": "nf4", "seq": 2048, "batch": 2,
           "status": "ok", "grad_ckpt": "slothnb", "step_s_median": 0.33, "tokens_per_s": 12226.0,
           "peak_alloc_gib": 6.41, "peak_reserved_gib": 6.77, "losses": [12.55, 12.60, 12.61],
           "ab_variants": [
               {"switch": "defaults", "steps": 20, "tok_s": 12226.2, "host_ms": 330.6, "peak_alloc_gib": 6.41},
               {"switch": "slothnb.kernels.lora_widened.KEEP_GATE_UP=0", "steps": 20, "tok_s": 12088.3,
                "host_ms": 338.7, "peak_alloc_gib": 6.221, "honest_peak_gib": 6.25}]}
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps(dict(rec, ab_variants=None)) + "\n")
    table, _ = report.step_tables(str(path), default_peak=778.0)
    rows = [line for line in table.splitlines() if line.startswith("| defaults") or line.startswith("| slothnb.kernels")]
    assert rows == ["| defaults | 20 | 12,226 | 330.6 | 6.410 |  |",
                    "| slothnb.kernels.lora_widened.KEEP_GATE_UP=0 | 20 | 12,088 | 338.7 | 6.250 |  |"]
    assert table.count("one process, steps taken in turn") == 1  # the record without slots adds none
    # with the record's step times, each variant's speed against the defaults, round by round
    rec.update(warmup=2, step_times_s=[9.0, 9.0] + [0.30, 0.33] * 20)
    path.write_text(json.dumps(rec) + "\n")
    table, _ = report.step_tables(str(path), default_peak=778.0)
    assert "| 6.250 | -9.1% [-9.1, -9.1] |" in table


def test_paired_change_is_the_median_round_by_round_with_a_bootstrap_interval():
    """Each round (defaults, then the variants, back to back) gives defaults time / variant time - 1; a
    hiccup spoils one round, not the median; the interval comes from resampling the rounds."""
    import report

    times = []
    for i in range(30):  # the host drifts slowly; variant 1 is 10% faster, variant 2 the same as the defaults
        base = 0.30 + 0.002 * i
        times += [base, base / 1.10, base]
    times[3 * 7 + 1] = 0.9  # one hiccup in variant 1's steps
    med, lo, hi = report.paired_change(times, 2, 1)
    assert med == 10.0 and lo <= 10.0 <= hi and lo > 5
    med, lo, hi = report.paired_change(times, 2, 2)
    assert med == 0.0 and lo <= 0.0 <= hi
    assert report.paired_change(times[:6], 2, 1) is None  # two rounds are too few
    rng = __import__("random").Random(1)
    noisy = [0.30 * (1 + rng.gauss(0, 0.03)) for _ in range(80)]  # the same code in both slots, 3% noise
    med, lo, hi = report.paired_change(noisy, 1, 1)
    assert lo < 0.0 < hi and hi - lo < 6


def test_report_lists_each_step_with_what_it_pinned_and_allocated(tmp_path):
    """The first timed steps of a run that was still pinning show it: step/host ms, w (ms the host waited for
    copies, from 0.5 ms), p (pinned), m (cudaMalloc)."""
    import json

    import report

    rec = {"kind": "bench", "system": "slothnb", "model": "8b", "quant": "nf4", "seq": 2048, "batch": 2,
           "warmup": 3, "tokens_per_s": 12500.0, "step_times_s": [2.31, 0.378, 0.3117],
           "host_queued_s": [2.31, 0.364, 0.2669],
           "offload_counts_by_step": [{"pinned_background": 40, "pinned_inline": 16}, {"pinned_background": 2, "pace_wait_us": 400},
                                      {"pace_wait_us": 41_700}],
           "allocator_by_step": [[0, 245, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]]}
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps({"kind": "bench", "system": "hf"}) + "\n")
    assert report.step_lines(str(path)) == ("8b nf4 2048x2 (12500.0 tok/s, warm-up 3): "
                                            "2310/2310 p56 m245 | 378/364 p2 | 312/267 w42 m1")
