"""The kernel benchmarks' measurement (bench/_timing.py) and a CPU smoke run of
bench/kernels_elementwise.py at tiny shapes (slothnb rows on Triton's interpreter)."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import _timing  # noqa: E402
import kernels_elementwise  # noqa: E402


def test_split_calls_skips_reset_kernels():
    mark = ("at::cuda::(anonymous namespace)::spin_kernel(long)", 0.1)
    events = [("a", 2.0), ("b", 3.0), mark, ("copy", 50.0), mark, ("a", 2.5), mark, mark]
    assert _timing._split_calls(events, with_reset=True) == [5.0, 2.5]
    assert _timing._split_calls([("a", 1.0), mark, ("a", 2.0), ("b", 1.0), mark], with_reset=False) == [1.0, 3.0]


def test_device_ms_is_none_off_cuda():
    assert _timing.device_ms(lambda k: None, "cpu") is None


def test_kernels_elementwise_smoke_on_cpu(monkeypatch):
    monkeypatch.setattr(kernels_elementwise, "WARMUP", 1)
    monkeypatch.setattr(kernels_elementwise, "REPEATS", 1)
    monkeypatch.setattr(kernels_elementwise, "SETS", 1)
    rows = kernels_elementwise.bench_all("cpu", tokens=4, batch=2, hidden=32, intermediate=32, q_heads=2,
                                         kv_heads=1, head_dim=16)
    assert rows[0]["op"] == "copy" and rows[0]["bandwidth_GBps"] > 0
    ops = {(r["op"], r["mode"], r["impl"]) for r in rows[1:]}
    assert ("layer_norm", "fwd+bwd", "slothnb") in ops and ("rope", "fwd", "eager") in ops
    for r in rows[1:]:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["gpu_ms"] is None and r["floor_frac"] >= 0


@pytest.mark.gpu
def test_device_ms_counts_the_call_not_the_reset():
    """gpu_ms of a 256 MiB copy matches its CUDA-event time, whatever a (4x larger) reset launches."""
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    big2 = torch.empty_like(big)
    ms, _ = _timing.time_and_memory(lambda k: dst.copy_(src), "cuda")
    gpu = _timing.device_ms(lambda k: dst.copy_(src), "cuda", reset=lambda k: big2.copy_(big))
    assert gpu is not None and 0.7 * ms <= gpu <= 1.05 * ms, (gpu, ms)


def test_copy_sites_name_the_python_line_or_the_autograd_node():
    import profile_step
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(8, 8, requires_grad=True)
    with torch.autograd.set_multithreading_enabled(False), \
            profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        y = x.t().contiguous()  # a copy made here, in this file
        (y.to(torch.float64) * 2).sum().backward()  # its backward casts back: a copy under an autograd node
    rows = {site: n for site, n, _, _ in profile_step.copy_sites(prof)}
    here = [site for site in rows if "test_bench_timing.py" in site]
    assert here and rows[here[0]] >= 1
    assert any(site.startswith("backward of ToCopyBackward") for site in rows), rows


def test_memset_sites_count_the_memsets_each_op_launched_by_site():
    from types import SimpleNamespace as NS

    import profile_step

    frame = NS(name="kernels/lora.py(120): _forward", cpu_parent=None)
    node = NS(name="autograd::engine::evaluate_function: MmBackward0", cpu_parent=None)
    kernel = lambda name, us: NS(name=name, duration=us)  # noqa: E731
    events = [NS(name="aten::zero_", kernels=[kernel("Memset (Device)", 3.0)], cpu_parent=frame),
              NS(name="aten::zero_", kernels=[kernel("Memset (Device)", 5.0)], cpu_parent=frame),
              NS(name="aten::mm", kernels=[kernel("Memset (Device)", 1.0), kernel("gemm_splitk", 9.0),
                                          kernel("Memset (Device)", 1.0)], cpu_parent=node),
              NS(name="aten::add_", kernels=[kernel("elementwise", 4.0)], cpu_parent=frame)]
    rows = profile_step.memset_sites(NS(events=lambda: events))
    assert rows == [("aten::zero_ @ kernels/lora.py(120): _forward", 2, 0.008),  # as many: the longer first
                    ("aten::mm @ backward of MmBackward0", 2, 0.002)]


def test_host_probe_measures_this_host():
    import host_usage

    probe = host_usage.host_probe(repeats=1)
    assert probe["python_ns_per_iter"] > 0 and probe["cpu_op_us"] > 0
    assert (probe["cuda_launch_us"] is None) == (not torch.cuda.is_available())


def test_gc_pauses_are_counted_per_step_and_by_generation():
    import gc

    import host_usage

    pauses = host_usage.GcPauses()
    pauses.begin_step()
    gc.collect(0)
    pauses.begin_step()
    gc.collect(2)
    rows = pauses.close()
    assert [r[1:] for r in rows] == [[1, 0, 0], [0, 0, 1]] and all(r[0] >= 0 for r in rows)
    assert pauses._callback not in gc.callbacks


def test_gemm_flops_from_recorded_shapes():
    import profile_step

    assert profile_step._gemm_flops("aten::mm", [[4, 8], [8, 16]]) == 2 * 4 * 8 * 16
    assert profile_step._gemm_flops("aten::addmm_", [[4, 16], [4, 8], [8, 16]]) == 2 * 4 * 8 * 16
    assert profile_step._gemm_flops("aten::add", [[4], [4]]) is None
    assert profile_step._gemm_flops("aten::mm", [[4, 8]]) is None  # shapes not recorded


def test_sync_steps_split_wall_time_by_phase():
    import profile_step

    spin = "spin_kernel"
    # step 1 (wall 100 us): markers at 0, 40, 80; forward kernels 5-20 and 25-35 (gap 5), backward 45-75,
    # optimizer 82-90 -> start 5, tail 100 - 90 = 10
    step1 = [(0, 1, spin), (5, 20, "gemm"), (25, 35, "norm"), (40, 41, spin), (45, 75, "gemm"), (80, 81, spin),
             (82, 90, "adam")]
    step2 = [(s0 + 200, s1 + 200, n) for s0, s1, n in step1]
    rows, by_next = profile_step.split_sync_steps(step1 + step2, [100e-6, 100e-6], min_gap_us=3)
    assert rows["wall"] == pytest.approx(200) and rows["start"] == pytest.approx(8)  # 4 us a step, twice
    assert rows["tail"] == pytest.approx(20)
    assert rows["forward busy"] == pytest.approx(50) and rows["forward gaps"] == pytest.approx(10)
    assert rows["backward busy"] == pytest.approx(60) and rows["backward gaps"] == pytest.approx(8)
    assert rows["optimizer busy"] == pytest.approx(16) and rows["optimizer gaps"] == pytest.approx(2)
    assert by_next[("forward", "norm")] == (2, pytest.approx(10))
    with pytest.raises(ValueError, match="markers"):
        profile_step.split_sync_steps(step1[1:], [100e-6])


def test_lora_step_ab_switch_parses_settings_and_splits_the_steps():
    import lora_step
    from slothnb.kernels import _utils, lora, lora_widened

    switches = lora_step._switches("slothnb.kernels._utils._RUNTIME=None,slothnb.kernels.lora_widened.DEQUANT_TAIL=0,"
                                   "slothnb.kernels.lora.H_CHUNK_BYTES=4096")
    assert switches == [(_utils, "_RUNTIME", None), (lora_widened, "DEQUANT_TAIL", False), (lora, "H_CHUNK_BYTES", 4096)]
    assert lora_step._switches("") == []
    from slothnb.models import carrying

    assert lora_step._switches("slothnb.models.carrying.GATE_UP_BACKLOG_PAIRS=1.5,"
                               "slothnb.models.carrying.GATE_UP_SLOTS=fixed") == [
        (carrying, "GATE_UP_BACKLOG_PAIRS", 1.5), (carrying, "GATE_UP_SLOTS", "fixed")]
    assert lora_step._switches("slothnb.models.carrying.CARRY_MLP=False") == [(carrying, "CARRY_MLP", False)]
    assert lora_step._switches("slothnb.models.carrying.CARRY_MLP=True") == [(carrying, "CARRY_MLP", True)]
    with pytest.raises(ValueError, match="boolean setting"):
        lora_step._switches("slothnb.models.carrying.CARRY_MLP=off")
    with pytest.raises(AttributeError):
        lora_step._switches("slothnb.kernels.lora.NO_SUCH_SETTING=1")
    # even timed steps ran the defaults, odd ones the switch
    ab = lora_step.ab_halves("x=1", [0.1, 0.2, 0.1, 0.2, 0.1], [0.05, 0.08, 0.05, 0.08, 0.05], tokens=1000)
    assert ab == {"switch": "x=1", "default_tok_s": 10000.0, "switched_tok_s": 5000.0,
                  "default_host_ms": 50.0, "switched_host_ms": 80.0}


def test_lora_step_ab_variants_take_turns_with_the_defaults():
    import lora_step

    # 2 warm-up steps, then defaults, A, B, defaults, ...; the warm-up steps take turns as well
    assert [lora_step.variant_of_step(i, 2, 2) for i in range(8)] == [0, 1, None, 0, 1, None, 0, 1]
    assert [lora_step.variant_of_step(i, 3, 1) for i in range(7)] == [0, None, 0, None, 0, None, 0]
    assert lora_step.variant_of_step(5, 3, 0) is None
    assert len(lora_step._variants("slothnb.kernels.lora.H_CHUNK_BYTES=1;slothnb.kernels.lora.H_CHUNK_BYTES=2")) == 2
    times = [0.1, 0.2, 0.4, 0.1, 0.2, 0.4]  # defaults, A, B, defaults, A, B
    rows = lora_step.ab_slots("A;B", times, [t / 2 for t in times], [1 << 30, 2 << 30, 3 << 30] * 2, 1000, 2)
    assert [(r["switch"], r["tok_s"], r["host_ms"], r["peak_alloc_gib"], r["steps"]) for r in rows] == [
        ("defaults", 10000.0, 50.0, 1.0, 2), ("A", 5000.0, 100.0, 2.0, 2), ("B", 2500.0, 200.0, 3.0, 2)]
    replays = [0, 0, 0, 4 << 30, 0, 0]  # a graph replay of the defaults' second step reached 4 GiB
    rows = lora_step.ab_slots("A;B", times, times, [1 << 30, 2 << 30, 3 << 30] * 2, 1000, 2, replays)
    assert [r["honest_peak_gib"] for r in rows] == [4.0, 2.0, 3.0]


def test_ab_levers_names_settings_that_exist():
    """bench/ab_levers.sh's variants resolve here (a misspelt name would cost a GPU call to find)."""
    import re
    import subprocess

    import lora_step

    script = Path(__file__).resolve().parent.parent / "bench" / "ab_levers.sh"
    text = script.read_text()
    lines = re.search(r"^SDPA=.*?^VARIANTS=[^\n]*", text, re.M | re.S).group(0)  # the assignments only
    variants = subprocess.run(["bash", "-c", lines + '\necho "$VARIANTS"'], capture_output=True,
                              text=True, check=True).stdout.strip()
    parsed = lora_step._variants(variants)
    assert len(parsed) == 8 and all(parsed)
    names = {f"{m.__name__}.{attr}" for v in parsed for m, attr, _ in v}
    assert "slothnb.models.arch.sdpa_direct.CUDA" in names and "slothnb.kernels.lora_widened.KEEP" in names
    assert "slothnb.models.carrying.GATE_UP_PACING" in names and "slothnb.models.host_offload.LAYERS_AHEAD" in names


def test_host_costs_times_the_same_gradient_both_ways(capsys, monkeypatch):
    import host_costs

    monkeypatch.setattr(host_costs, "best_us", lambda fn, **kw: (fn(), 1.0)[1])
    monkeypatch.setattr(sys, "argv", ["host_costs.py", "--functions", "3"])
    host_costs.main()
    out = capsys.readouterr().out
    assert "3 Functions, forward + backward: autograd 1.0 us, direct 1.0 us" in out
    assert "Parameter: requires_grad 1.00 us, is_cuda 1.00 us, data_ptr() 1.00 us" in out
    x = torch.randn(4, 8, requires_grad=True)
    ctx = host_costs.PlainContext()
    y = host_costs.Chain.forward(ctx, x.detach(), torch.ones(4), torch.ones(4))
    assert torch.equal(y, x.detach()) and ctx.saved_tensors[0] is not None
    assert host_costs.Chain.backward(ctx, torch.full((4, 8), 2.0))[0].eq(2.0).all()


def test_run_gpu_expands_targets_to_every_case_of_the_issue():
    """`bash bench/run_gpu.sh targets` runs each target case once (checked dry: no GPU, no wheels)."""
    import os
    import subprocess

    script = Path(__file__).resolve().parent.parent / "bench" / "run_gpu.sh"
    out = subprocess.run(["bash", str(script), "tests", "targets"], capture_output=True, text=True, check=True,
                         env={**os.environ, "RUN_GPU_DRY": "1"}).stdout.split()
    assert out[:3] == ["tests", "info", "model:8b"]
    cases = [s for s in out if s.startswith("slothnb:")]
    assert cases == ["slothnb:8b:nf4:2048:2", "slothnb:8b:nf4:4096:2", "slothnb:8b:none:2048:2",
                     "slothnb:1b:none:2048:2", "slothnb:qwen7b:nf4:2048:2", "slothnb:gemma9b:nf4:2048:2"]
    assert {"model:1b", "model:qwen7b", "model:gemma9b"} <= set(out)
    graphs = subprocess.run(["bash", str(script), "forward-graphs"], capture_output=True, text=True, check=True,
                            env={**os.environ, "RUN_GPU_DRY": "1"}).stdout.split()
    assert graphs == ["graphs:8b:none:2048:2", "graphs:8b:nf4:2048:2", "graphs:8b:nf4:4096:2",
                      "graphs:qwen7b:nf4:2048:2", "graphs:gemma9b:nf4:2048:2"]


def test_host_usage_places_each_step_on_its_checkpointed_layers():
    """``host_usage.HostUsage``: per step the process's CPU and context switches, and the host ms between
    the checkpointed layers' forward and backward starts (one interval fewer than layers, each way)."""
    import host_usage
    from slothnb.models import checkpointing
    from slothnb.models.checkpointing import offloaded_checkpoint

    layers = [torch.nn.Linear(8, 8) for _ in range(3)]
    usage = host_usage.HostUsage()
    try:
        for _ in range(2):
            usage.begin_step()
            x = torch.randn(2, 8, requires_grad=True)
            for layer in layers:
                x = offloaded_checkpoint(layer, x)
            x.sum().backward()
            usage.end_step()
    finally:
        rows = usage.close()
    assert checkpointing.HOST_MARKS is None
    assert len(rows) == 2
    for row in rows:
        assert len(row["fwd"]) == 2 and len(row["bwd"]) == 2
        assert all(v >= 0 for v in row["fwd"] + row["bwd"] + [row["before"], row["mid"], row["after"]])
        assert row["cpu_ms"] >= 0 and row["nivcsw"] >= 0 and row["minflt"] >= 0
        assert "gpu_fwd" not in row  # no CUDA events off CUDA


def test_gpu_by_layer_gives_the_gpu_intervals_and_how_far_it_was_behind():
    """Host marks at 1, 2, 3 ms (forward) and 10, 14 ms (backward) after the step's start; the GPU reached
    them at 1.5, 5, 8.5 and 20, 25: its intervals, and how far it was behind the host at each."""
    import host_usage

    gpu_at = {"f0": 1.5, "f1": 5.0, "f2": 8.5, "b0": 20.0, "b1": 25.0}
    t0 = 7_000_000
    marks = [("f", t0 + 1_000_000, "f0"), ("f", t0 + 2_000_000, "f1"), ("f", t0 + 3_000_000, "f2"),
             ("b", t0 + 10_000_000, "b0"), ("b", t0 + 14_000_000, "b1")]
    got = host_usage.gpu_by_layer(marks, t0, gpu_at.__getitem__)
    assert got == {"gpu_fwd": [3.5, 3.5], "behind_fwd": [0.5, 3.0, 5.5], "gpu_bwd": [5.0], "behind_bwd": [10.0, 11.0]}
    assert host_usage.gpu_by_layer([("f", t0, None)], t0, gpu_at.__getitem__) == {}


def test_report_prints_the_host_by_step_with_its_slowest_layer(tmp_path):
    import json

    import report

    rec = {"kind": "bench", "system": "slothnb", "model": "8b", "quant": "none", "seq": 2048, "batch": 2,
           "step_times_s": [0.395], "host_queued_s": [0.392],
           "host_usage_by_step": [{"cpu_ms": 251.0, "main_cpu_ms": 120.4, "sys_ms": 9.0, "minflt": 12, "majflt": 0,
                                   "nvcsw": 40, "nivcsw": 85, "before": 1.2, "fwd": [2.0, 2.2, 40.0], "mid": 9.5,
                                   "bwd": [4.0, 4.5, 4.1], "after": 12.0, "gpu_fwd": [3.5, 3.6, 3.7],
                                   "behind_fwd": [0.4, 2.0, 0.1, 1.0], "gpu_bwd": [5.4, 5.5, 5.3],
                                   "behind_bwd": [30.0, 20.0, 12.5, 9.0]}]}
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    assert report.host_lines(str(path)).splitlines()[1] == (
        "   0 395/392 | 251 120 9 | 85 12 | 2.2/40@2 4.1/4@1 | 1.2 9.5 12.0 | 3.6 5.4 | 0.7 9.0")


def test_report_reads_an_ab_run_by_halves_of_its_rounds():
    """Two slots over 8 rounds: the defaults hold 300 ms while the variant slows from 305 to 327 ms, with the
    host's forward from 3.4 to 4.0 ms a layer: the halves say so where the run's median cannot."""
    import report

    times, hosts = [], []
    for k in range(8):
        slow = k >= 4
        times += [0.300, 0.327 if slow else 0.305]
        hosts += [{"fwd": [1.0, 6.0]}, {"fwd": [4.0 if slow else 3.4] * 3}]
    rec = {"warmup": 2, "step_times_s": [1.0, 1.0] + times, "host_usage_by_step": [{}, {}] + hosts,
           "ab_variants": [{"switch": "defaults"}, {"switch": "ACTIVE=0"}]}
    assert report.halves_lines(rec)[-2:] == ["- first 4 rounds: defaults 300 / 3.50; ACTIVE=0 305 / 3.40",
                                            "- last 4 rounds: defaults 300 / 3.50; ACTIVE=0 327 / 4.00"]
    assert report.halves_lines(dict(rec, step_times_s=rec["step_times_s"][:8])) == []  # 3 rounds: too few


def test_layer_ops_counts_each_pass_of_the_written_out_layer():
    """``bench/layer_ops.py``: per checkpointed layer, the aten ops and Triton launches of its forward,
    recompute and backward, without the ops Triton's interpreter issues (thousands a kernel)."""
    import layer_ops

    got = layer_ops.census("none", layers=3)
    assert got["layers"] == 2
    for name in layer_ops.PASSES:
        row = got[name]
        assert 20 < row["ops"] < 250 and row["launches"] >= 3, (name, row["ops"], row["launches"])
        assert sum(row["by_op"].values()) == pytest.approx(row["ops"], abs=0.05)
    assert got["forward"]["by_op"]["aten.addmm_.default"] == 7  # each projection's base matmul adds itself
    assert got["recompute"]["ops"] < got["forward"]["ops"]  # it reuses the forward's casts and skips the down projection

