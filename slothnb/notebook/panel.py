"""Live training panel: a pure-data ``PanelState`` and three views of it.

The state knows nothing about displays, so it is what tests and other front ends read. Views:

- ``WidgetView``: an ipywidgets box (HTML + two PNG images), updated in place. Only APIs that
  ipywidgets 7.x (Colab) and 8.x share are used.
- ``HtmlView``: one HTML output (PNG plots inlined as base64) updated through a ``display_id``.
- ``TextView``: a status line printed to stdout for terminals and plain Python.

``LivePanel.refresh`` redraws at most every ``min_interval`` seconds (default 0.25 s, so <= 4/s)
because rendering a matplotlib PNG costs ~50 ms and a busy kernel must not spend its time drawing.
"""
from __future__ import annotations

import base64
import html
import sys
import time
from dataclasses import dataclass, field

from slothnb.notebook.plots import GIB, loss_plot_png, memory_bars_png

PANEL_CLASS = "slothnb-panel"


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class PanelState:
    """Everything the panel shows, as plain data."""

    title: str = "slothnb fine-tuning"
    total_steps: int | None = None
    step: int = 0
    loss_steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lr_steps: list[int] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    tokens_seen: float = 0.0
    tokens_per_second: float | None = None
    started: float | None = None
    elapsed: float = 0.0
    memory_rows: list[dict] = field(default_factory=list)  # MemoryRecorder.to_rows() plus a live "now" row
    status: str = "starting"  # starting | training | done | interrupted | error
    message: str = ""

    def start(self, total_steps: int | None, now: float | None = None) -> None:
        self.total_steps = total_steps
        self.started = time.perf_counter() if now is None else now
        self.status = "training"

    def log(self, step: int, logs: dict, now: float | None = None) -> None:
        """Fold one trainer log row (``{"loss", "learning_rate", "num_tokens", ...}``) into the state."""
        now = time.perf_counter() if now is None else now
        if self.started is None:
            self.started = now
        self.step = int(step)
        self.elapsed = now - self.started
        if "loss" in logs:
            self.loss_steps.append(int(step))
            self.losses.append(float(logs["loss"]))
        if "learning_rate" in logs:
            self.lr_steps.append(int(step))
            self.learning_rates.append(float(logs["learning_rate"]))
        if "num_tokens" in logs:
            self.tokens_seen = float(logs["num_tokens"])
            self.tokens_per_second = self.tokens_seen / self.elapsed if self.elapsed > 0 else None

    def advance(self, step: int, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self.step = int(step)
        if self.started is not None:
            self.elapsed = now - self.started

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Remaining time at the average pace so far (None before the first step)."""
        if not self.total_steps or self.step <= 0 or self.elapsed <= 0:
            return None
        return max(0.0, (self.total_steps - self.step) * self.elapsed / self.step)

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def summary(self) -> str:
        """One status line: what the text view prints and the HTML header shows."""
        total = self.total_steps if self.total_steps else "?"
        parts = [f"[{self.status}] step {self.step}/{total}"]
        if self.last_loss is not None:
            parts.append(f"loss {self.last_loss:.4f}")
        if self.learning_rates:
            parts.append(f"lr {self.learning_rates[-1]:.2e}")
        if self.tokens_per_second:
            parts.append(f"{self.tokens_per_second:,.0f} tok/s")
        parts.append(f"elapsed {_duration(self.elapsed)}")
        parts.append(f"ETA {_duration(self.eta_seconds)}")
        if self.memory_rows:
            from slothnb.notebook.plots import memory_value

            value, what = memory_value(self.memory_rows[-1])
            parts.append(f"mem {value:.2f} GiB ({what})")
        line = " | ".join(parts)
        return f"{line} | {self.message}" if self.message else line


# ---- views --------------------------------------------------------------------------------------

def _img_tag(png: bytes, alt: str, css_class: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{css_class}" alt="{alt}" src="data:image/png;base64,{data}"/>'


def header_html(state: PanelState) -> str:
    pct = int(round(100 * state.progress))
    return (
        f'<div class="slothnb-header"><b>{html.escape(state.title)}</b> '
        f'<span class="slothnb-status">{html.escape(state.summary())}</span>'
        f'<div style="background:#e9ecef;height:8px;width:420px;margin-top:4px">'
        f'<div class="slothnb-progress" style="background:#37b24d;height:8px;width:{pct}%"></div></div></div>'
    )


def render_html(state: PanelState, plots: bool = True) -> str:
    """The whole panel as one HTML fragment (plots inlined as PNG data URIs)."""
    body = header_html(state)
    if plots:
        loss_png = loss_plot_png(state.loss_steps, state.losses, state.lr_steps, state.learning_rates)
        mem_png = memory_bars_png(state.memory_rows)
        body += ('<div style="display:flex;flex-wrap:wrap;gap:8px">'
                 + _img_tag(loss_png, "loss plot", "slothnb-loss-plot")
                 + _img_tag(mem_png, "memory by stage", "slothnb-memory-bars") + "</div>")
    return f'<div class="{PANEL_CLASS}">{body}</div>'


class TextView:
    """Prints the status line; a terminal gets no plots."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def show(self, state: PanelState) -> None:
        self.update(state)

    def update(self, state: PanelState) -> None:
        print(state.summary(), file=self.stream, flush=True)


class HtmlView:
    """One display output updated in place (works wherever HTML renders, widgets or not)."""

    def __init__(self):
        self.handle = None

    def _bundle(self, state):
        return {"text/html": render_html(state), "text/plain": state.summary()}

    def show(self, state: PanelState) -> None:
        from IPython.display import display

        self.handle = display(self._bundle(state), raw=True, display_id=True)

    def update(self, state: PanelState) -> None:
        if self.handle is None:
            return self.show(state)
        self.handle.update(self._bundle(state), raw=True)


class WidgetView:
    """ipywidgets box: header HTML, loss plot and memory bars as Image widgets (7.x and 8.x APIs)."""

    def __init__(self):
        import ipywidgets as w

        self.header = w.HTML()
        self.loss = w.Image(format="png")
        self.memory = w.Image(format="png")
        self.box = w.VBox([self.header, w.HBox([self.loss, self.memory])])
        self.box.add_class(PANEL_CLASS)
        self.loss.add_class("slothnb-loss-plot")
        self.memory.add_class("slothnb-memory-bars")

    def show(self, state: PanelState) -> None:
        from IPython.display import display

        self.update(state)
        display(self.box)

    def update(self, state: PanelState) -> None:
        self.header.value = header_html(state)
        self.loss.value = loss_plot_png(state.loss_steps, state.losses, state.lr_steps, state.learning_rates)
        self.memory.value = memory_bars_png(state.memory_rows)


def make_view(renderer: str):
    return {"widgets": WidgetView, "html": HtmlView, "text": TextView}[renderer]()


class LivePanel:
    """A state plus a view, redrawn at most every ``min_interval`` seconds (``force`` skips the wait)."""

    def __init__(self, state: PanelState | None = None, renderer: str | None = None, min_interval: float = 0.25,
                 clock=time.monotonic):
        from slothnb.notebook.frontend import choose_renderer

        self.state = state or PanelState()
        self.renderer = choose_renderer(renderer)
        self.view = make_view(self.renderer)
        self.min_interval = min_interval
        self.clock = clock
        self.last_draw = None
        self.draws = 0

    def show(self) -> None:
        self.view.show(self.state)
        self.last_draw = self.clock()
        self.draws += 1

    def due(self) -> bool:
        """Whether a redraw now would pass the throttle."""
        return self.last_draw is None or self.clock() - self.last_draw >= self.min_interval

    def refresh(self, force: bool = False) -> bool:
        """Redraw unless the last draw was under ``min_interval`` ago; True when it drew."""
        now = self.clock()
        if not force and self.last_draw is not None and now - self.last_draw < self.min_interval:
            return False
        if self.last_draw is None:
            self.view.show(self.state)
        else:
            self.view.update(self.state)
        self.last_draw = now
        self.draws += 1
        return True


def memory_rows_now() -> list[dict]:
    """Recorded stages plus a live "now" row (what the panel's bar chart shows)."""
    from slothnb.memory import RECORDER, MemoryRecorder

    live = MemoryRecorder()
    live.record("now", reset_peak=False)
    return RECORDER.to_rows() + live.to_rows()


def gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"
