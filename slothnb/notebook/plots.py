"""matplotlib plots rendered straight to PNG bytes.

A ``Figure`` drawn on an Agg canvas never touches pyplot, so the user's backend, open figures and
``%matplotlib`` setting are left alone, and the same bytes serve the widget, HTML and file views.
"""
from __future__ import annotations

import io

GIB = 1024**3


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return buf.getvalue()


def loss_plot_png(steps, losses, lr_steps=(), lrs=(), width=5.0, height=2.6) -> bytes:
    """Training loss against step, learning rate on a second axis (dashed) when given."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot(1, 1, 1)
    if len(steps):
        ax.plot(list(steps), list(losses), color="#d9480f", marker="." if len(steps) < 40 else None, label="loss")
    else:
        ax.text(0.5, 0.5, "waiting for the first logged step", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if len(lr_steps):
        ax2 = ax.twinx()
        ax2.plot(list(lr_steps), list(lrs), color="#1c7ed6", linestyle="--", linewidth=1, label="learning rate")
        ax2.set_ylabel("learning rate", color="#1c7ed6")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.set_title("training loss")
    return _png(fig)


def memory_value(row: dict) -> tuple[float, str]:
    """(GiB, what it measures) for one ``MemoryRecorder.to_rows()`` row: the GPU peak when there is a GPU,
    else the process's resident CPU memory."""
    if row.get("has_gpu"):
        value = row.get("peak_reserved") or row.get("reserved") or row.get("allocated") or 0
        return value / GIB, "GPU peak reserved"
    return (row.get("cpu_rss") or 0) / GIB, "CPU resident"


def memory_bars_png(rows, width=5.0, height=2.6) -> bytes:
    """Horizontal bars of memory by stage (the rows of ``MemoryRecorder.to_rows()``)."""
    from matplotlib.figure import Figure

    rows = list(rows)
    fig = Figure(figsize=(width, max(height, 0.35 * len(rows) + 1.0)))
    ax = fig.add_subplot(1, 1, 1)
    if rows:
        values = [memory_value(r)[0] for r in rows]
        label = memory_value(rows[-1])[1]
        names = [str(r["stage"]) for r in rows]
        y = list(range(len(rows)))[::-1]
        ax.barh(y, values, color="#37b24d")
        ax.set_yticks(y)
        ax.set_yticklabels(names)
        for yi, v in zip(y, values):
            ax.text(v, yi, f" {v:.2f}", va="center", fontsize=8)
        ax.set_xlabel(f"{label} (GiB)")
        ax.set_xlim(0, max(values) * 1.25 or 1)
    else:
        ax.text(0.5, 0.5, "no stage recorded yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("memory by stage")
    return _png(fig)
