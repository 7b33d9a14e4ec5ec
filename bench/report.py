#!/usr/bin/env python3
"""Markdown tables for docs/benchmarks.md from a GPU run's output folder.

    python bench/report.py OUT_DIR [PEAK_TFLOPS]   # reads OUT_DIR/results.jsonl and OUT_DIR/kernels.json

PEAK_TFLOPS: the matmul ceiling for MFU when the run did not measure one (no ``info`` step).

Step benchmarks: one table per case (model, quant, seq, batch) with every system that ran in
that folder's run, and for a run with ``--ab-switch`` its slots (the defaults and each variant, steps
taken in turn in one process: the way to compare engine switches on one machine), with each variant's
speed against the defaults' round by round; kernels: one table per op family, as bench/kernels_ops.py
wrote them.
"""
import json
import os
import random
import statistics
import sys

N_MATMUL = {"1b": 1.236e9, "8b": 7.505e9, "qwen7b": 7.070e9, "gemma9b": 9.241e9}


def step_tables(path, default_peak=None):
    recs = [json.loads(line) for line in open(path) if line.startswith("{")]
    peak = next((r["matmul"]["tflops_median"] for r in recs if r.get("kind") == "device_info"), default_peak)
    cases = {}
    for r in recs:
        if r.get("kind") == "bench":
            cases.setdefault((r["model"], r["quant"], r["seq"], r["batch"]), []).append(r)
    out = []
    for (model, quant, seq, batch), rows in cases.items():
        out.append(f"\n**{model} {'QLoRA (NF4)' if quant == 'nf4' else 'bf16 LoRA'}, seq {seq}, batch {batch}**\n")
        out.append("| system | checkpointing | step s | tokens/s | MFU | peak alloc GiB | peak reserved GiB | first losses |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r.get("env"):  # slothnb switches set for this row (e.g. SLOTHNB_RECOMPUTE_SKIP=0)
                r = dict(r, system=f"{r['system']} ({' '.join(f'{k}={v}' for k, v in sorted(r['env'].items()))})")
            if r.get("status") != "ok":
                out.append(f"| {r['system']} | {r.get('grad_ckpt', '')} | failed: {str(r.get('error', ''))[:120]} | | | | | |")
                continue
            mfu = 6 * N_MATMUL.get(model, r.get("n_matmul_params", 0)) * r["tokens_per_s"] / (peak * 1e12) if peak else None
            losses = " ".join(f"{v:.3f}" for v in r["losses"][:3])
            alloc = f"{r['peak_alloc_gib']:.2f}"
            if r.get("graph_honest_peak_gib") is not None:  # CUDA graphs: their replays' temporaries counted too
                alloc += f" ({r['graph_honest_peak_gib']:.2f} with the graphs' temporaries)"
            elif r.get("graph_pool_gib"):  # older records: only the pool's size is known
                alloc += f" + {r['graph_pool_gib']:.2f} graph pool"
            out.append(f"| {r['system']} | {r.get('grad_ckpt', '')} | {r['step_s_median']:.3f} | {r['tokens_per_s']:,.0f} | "
                       f"{'' if mfu is None else f'{100 * mfu:.1f}%'} | {alloc} | "
                       f"{r['peak_reserved_gib']:.2f} | {losses} |")
        for r in rows:
            out += ab_table(r)
    return "\n".join(out), peak


def ab_table(r):
    """The ``--ab-switch`` slots of one run (``lora_step.ab_slots``) as table lines, or none."""
    slots = r.get("ab_variants") or []
    if not slots:
        return []
    out = ["", f"{r['system']}, one process, steps taken in turn:", "",
           "| switch | steps | tokens/s | host ms a step | peak alloc GiB (graphs' temporaries counted) "
           "| tokens/s against the defaults, round by round: median [90% interval] |",
           "|---|---|---|---|---|---|"]
    timed = (r.get("step_times_s") or [])[r.get("warmup", 0):]
    for slot, v in enumerate(slots):
        peak = v.get("honest_peak_gib", v["peak_alloc_gib"])
        change = paired_change(timed, len(slots) - 1, slot) if slot else None
        against = "" if change is None else f"{change[0]:+.1f}% [{change[1]:+.1f}, {change[2]:+.1f}]"
        out.append(f"| {v['switch']} | {v['steps']} | {v['tok_s']:,.0f} | {v['host_ms']:.1f} | {peak:.3f} | {against} |")
    return out + halves_lines(r)


def halves_lines(r):
    """An ``--ab-switch`` run's rounds read in two halves: per slot, the median step (ms) and the median host
    ms a checkpointed layer's forward took (where recorded), in the first and the last half of the rounds.
    Why: a host's pace can drift by 15% within one process (session 29), and a lever for slow hosts shows
    where the host slowed, not in the run's median."""
    slots = r.get("ab_variants") or []
    warmup, n = r.get("warmup", 0), len(slots)
    times = (r.get("step_times_s") or [])[warmup:]
    hosts = (r.get("host_usage_by_step") or [])[warmup:]
    rounds = len(times) // n if n else 0
    if n < 2 or rounds < 4:
        return []
    out = ["", "By halves of the rounds (median step ms / the forward's host ms a layer):", ""]
    for label, (a, b) in (("first", (0, rounds // 2)), ("last", (rounds // 2, rounds))):
        cells = []
        for slot, v in enumerate(slots):
            idx = [k * n + slot for k in range(a, b)]
            step = statistics.median(times[i] for i in idx) * 1e3
            fwd = [statistics.median(hosts[i]["fwd"]) for i in idx if i < len(hosts) and hosts[i].get("fwd")]
            cells.append(f"{v['switch']} {step:.0f}" + (f" / {statistics.median(fwd):.2f}" if fwd else ""))
        out.append(f"- {label} {b - a} rounds: " + "; ".join(cells))
    return out


def paired_change(times, variants, slot, draws=2000, seed=0):
    """How much faster (%) the variant in ``slot`` ran than the defaults (slot 0), from the steps of an
    ``--ab-switch`` run (``times``: the timed steps, which take turns: defaults, variant 1, ...): the
    median over rounds of each round's defaults-step time over its variant-step time, minus one, and a
    bootstrap 90% interval of that median over the rounds. One round's steps run back to back, so the
    host's drift between rounds cancels; a hiccup spoils one round, not the median. None with fewer than
    three whole rounds."""
    n = variants + 1
    ratios = [times[i] / times[i + slot] - 1 for i in range(0, len(times) - n + 1, n)]
    if len(ratios) < 3:
        return None
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    lo, hi = medians[int(0.05 * draws)], medians[int(0.95 * draws) - 1]
    return tuple(round(100 * x, 2) for x in (statistics.median(ratios), lo, hi))


def kernel_tables(path):
    d = json.load(open(path))
    out = [f"GPU {d.get('gpu')}, torch {d.get('torch')}"]
    for fam, rows in d.items():
        if not isinstance(rows, list) or not rows:
            continue
        keys = list(dict.fromkeys(k for r in rows for k in r if k != "trace"))
        out += [f"\n**{fam}**\n", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        out += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(out)


def step_lines(path):
    """Each slothnb run's steps, warm-up included: ``step/host`` ms, then the ms of that host time spent
    waiting for copies (``w``, the engine's one wait on the GPU: the rest is the host's own work), what the
    step pinned (background + inline) and the allocator's cudaMallocs, where any: why a step was slow, at
    a glance (host = step and a large w: GPU- or link-paced; host = step and w ~0: host-paced)."""
    out = []
    for r in (json.loads(line) for line in open(path) if line.startswith("{")):
        if r.get("kind") != "bench" or r.get("system") != "slothnb" or "step_times_s" not in r:
            continue
        counts = r.get("offload_counts_by_step") or [{}] * len(r["step_times_s"])
        allocs = r.get("allocator_by_step") or [[0, 0, 0, 0]] * len(r["step_times_s"])
        cells = []
        for t, h, c, a in zip(r["step_times_s"], r["host_queued_s"], counts, allocs):
            pins = c.get("pinned_background", 0) + c.get("pinned_inline", 0)
            wait = c.get("pace_wait_us", 0) / 1e3
            cells.append(f"{t * 1e3:.0f}/{h * 1e3:.0f}" + (f" w{wait:.0f}" if wait >= 0.5 else "")
                         + (f" p{pins}" if pins else "") + (f" m{a[1]}" if a[1] else ""))
        out.append(f"{r['model']} {r['quant']} {r['seq']}x{r['batch']} ({r.get('tokens_per_s')} tok/s, warm-up "
                   f"{r.get('warmup', 3)}): " + " | ".join(cells))
    return "\n".join(out)


def _worst(intervals):
    """``median/max@index`` of a step's per-layer host intervals (ms), or ``-``."""
    if not intervals:
        return "-"
    top = max(range(len(intervals)), key=intervals.__getitem__)
    return f"{statistics.median(intervals):.1f}/{intervals[top]:.0f}@{top}"


def host_lines(path):
    """Each slothnb run's host by step (``host_usage.HostUsage``): host ms, then the process's CPU ms (all
    threads), the main thread's, system ms, involuntary context switches (``ic``) and page faults (``pf``),
    the checkpointed layers' host intervals in the forward and backward (median/max@layer, ms), the ms
    before the first layer, between the last forward and first backward (head and loss) and after the
    last backward (optimizer); where recorded, the same intervals on the GPU (medians) and how far the GPU
    was behind the host as a layer was queued: the median over the forward's layers (a few ms: the GPU has
    that little queued, and a slower host lengthens the step), the least over the backward's (~0: the GPU
    waited for the host there). A slow step says here whether the host lost the CPU (host over CPU, ``ic`` up), faulted,
    ran slower everywhere, and whether the GPU waited for it."""
    out = []
    for r in (json.loads(line) for line in open(path) if line.startswith("{")):
        rows = r.get("host_usage_by_step")
        if r.get("kind") != "bench" or r.get("system") != "slothnb" or not rows:
            continue
        out.append(f"{r['model']} {r['quant']} {r['seq']}x{r['batch']}: step/host | cpu main sys | ic pf | "
                   "fwd bwd (median/max@layer) | before mid after | gpu fwd bwd | behind fwd (median) bwd (least)")
        for i, (t, h, u) in enumerate(zip(r["step_times_s"], r["host_queued_s"], rows)):
            line = (f"  {i:2d} {t * 1e3:.0f}/{h * 1e3:.0f} | {u['cpu_ms']:.0f} {u['main_cpu_ms']:.0f} {u['sys_ms']:.0f}"
                    f" | {u['nivcsw']} {u['minflt'] + u['majflt']} | {_worst(u.get('fwd'))} {_worst(u.get('bwd'))}"
                    f" | {u.get('before', u.get('lead', '-'))} {u.get('mid', '-')} {u.get('after', u.get('tail', '-'))}")
            if u.get("gpu_fwd") and u.get("gpu_bwd"):
                line += (f" | {statistics.median(u['gpu_fwd']):.1f} {statistics.median(u['gpu_bwd']):.1f}"
                         f" | {statistics.median(u['behind_fwd']):.1f} {min(u['behind_bwd']):.1f}")
            out.append(line)
    return "\n".join(out)


def main(folder, default_peak=None):
    res, kern = os.path.join(folder, "results.jsonl"), os.path.join(folder, "kernels.json")
    if os.path.exists(res):
        tables, peak = step_tables(res, default_peak)
        print(f"Matmul ceiling (8192³ bf16, median): {peak} TFLOP/s\n{tables}")
        print("\nSteps (ms step/host; w: ms the host waited for copies, p: buffers pinned, m: cudaMallocs):\n" + step_lines(res))
        hosts = host_lines(res)
        if hosts:
            print("\nHost by step:\n" + hosts)
    if os.path.exists(kern):
        print("\n" + kernel_tables(kern))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench-out", float(sys.argv[2]) if len(sys.argv) > 2 else None)
