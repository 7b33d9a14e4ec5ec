"""``vram_report``: where GPU memory is, in the three views that disagree, plus every recorded stage.

Per GPU: what nvidia-smi shows (NVML used/total), what PyTorch's caching allocator holds (reserved),
what live tensors use (allocated), the peak, and ``gap = NVML used - reserved`` (CUDA context,
cuBLAS/Triton workspaces, other processes). Without a GPU it says so and shows CPU memory instead.
"""
from __future__ import annotations

import html

from slothnb.notebook.plots import GIB, memory_bars_png


def _gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def gpu_rows() -> list[dict]:
    """One dict per visible CUDA device: NVML used/total beside torch allocated/reserved/peak and the gap."""
    import torch

    from slothnb.memory import snapshot

    rows = []
    if not torch.cuda.is_available():
        return rows
    for index in range(torch.cuda.device_count()):
        s = snapshot(index)
        rows.append({"index": index, "name": s.device, "nvml_used": s.nvml_used, "nvml_total": s.nvml_total,
                     "allocated": s.allocated, "reserved": s.reserved, "peak_allocated": s.peak_allocated,
                     "peak_reserved": s.peak_reserved, "gap": s.gap})
    return rows


def cpu_row() -> dict:
    import psutil

    vm = psutil.virtual_memory()
    return {"process_rss": psutil.Process().memory_info().rss, "system_used": vm.total - vm.available,
            "system_total": vm.total}


def report_text(report: dict) -> str:
    lines = []
    if report["gpus"]:
        for g in report["gpus"]:
            lines.append(f"GPU {g['index']} {g['name']}: nvidia-smi used {_gib(g['nvml_used'])} / {_gib(g['nvml_total'])}"
                         f" | torch allocated {_gib(g['allocated'])}, reserved {_gib(g['reserved'])},"
                         f" peak {_gib(g['peak_reserved'])} | gap (context, workspaces, other processes)"
                         f" {_gib(g['gap'])}")
    else:
        c = report["cpu"]
        lines.append(f"No CUDA GPU visible: CPU memory instead. This process {_gib(c['process_rss'])};"
                     f" system {_gib(c['system_used'])} used of {_gib(c['system_total'])}.")
    lines.append("")
    lines.append(report["table"] if report["stages"] else "No stage recorded yet (load a model with %load_model).")
    return "\n".join(lines)


def report_html(report: dict, plot: bool) -> str:
    head = "".join(f"<p>{html.escape(line)}</p>" for line in report_text(report).split("\n\n")[0].splitlines())
    rows = report["stages"]
    table = ""
    if rows:
        cols = [("stage", "stage"), ("allocated", "allocated"), ("reserved", "reserved"),
                ("peak alloc", "peak_allocated"), ("peak reserved", "peak_reserved"), ("nvml used", "nvml_used"),
                ("gap", "gap"), ("pinned host", "pinned_host"), ("cpu rss", "cpu_rss")]
        th = "".join(f"<th>{h}</th>" for h, _ in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[k])) if k == 'stage' else _gib(r[k])}</td>"
                                        for _, k in cols) + "</tr>" for r in rows)
        table = f'<table class="slothnb-vram-stages"><tr>{th}</tr>{body}</table>'
    else:
        table = "<p>No stage recorded yet (load a model with %load_model).</p>"
    img = ""
    if plot:
        import base64

        data = base64.b64encode(memory_bars_png(rows)).decode("ascii")
        img = f'<img class="slothnb-memory-bars" alt="memory by stage" src="data:image/png;base64,{data}"/>'
    return f'<div class="slothnb-vram">{head}{table}{img}</div>'


def vram_report(reset: bool = False, stage: str | None = None, plot: bool = False, show: bool = True,
                renderer: str | None = None) -> dict:
    """Memory now and by stage. ``stage`` records one first; ``reset`` forgets every stage afterwards
    (the report shows what was there). Returns ``{"gpus", "cpu", "stages", "table"}``."""
    from slothnb.memory import RECORDER, record_stage
    from slothnb.notebook.frontend import choose_renderer

    if stage:
        record_stage(stage)
    report = {"gpus": gpu_rows(), "cpu": cpu_row(), "stages": RECORDER.to_rows(), "table": RECORDER.format_table()}
    if reset:
        RECORDER.reset()
    if show:
        if choose_renderer(renderer) == "text":
            print(report_text(report))
            if reset:
                print("(stages cleared)")
        else:
            from IPython.display import display

            extra = "\n(stages cleared)" if reset else ""
            display({"text/html": report_html(report, plot) + extra, "text/plain": report_text(report) + extra},
                    raw=True)
    return report
