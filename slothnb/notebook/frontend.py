"""Which front end runs this code, decided from the running kernel first.

The kernel tells the truth about where output goes: a ``ZMQInteractiveShell`` (ipykernel) has a
notebook-like client that renders HTML and images (JupyterLab, Notebook 7, VS Code, Kaggle), Colab's
shell lives in ``google.colab``; a terminal IPython or plain Python has none. Environment variables
(``VSCODE_PID``, ``KAGGLE_KERNEL_RUN_TYPE``) only name the client once the kernel says there is one.

``SLOTHNB_PANEL=widgets|html|text`` forces a renderer (for CI and odd set-ups).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

RENDERERS = ("widgets", "html", "text")


@dataclass(frozen=True)
class Frontend:
    name: str  # "colab" | "vscode" | "kaggle" | "jupyter" | "ipython-terminal" | "python"
    rich: bool  # renders HTML/PNG display data
    widgets: bool  # ipywidgets can be shown (importable and a comm-capable kernel)


def _shell():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def _widgets_importable() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except Exception:
        return False
    return True


def detect_frontend(shell=None) -> Frontend:
    """Classify the running kernel (``shell`` defaults to ``get_ipython()``)."""
    shell = shell if shell is not None else _shell()
    if shell is None:
        return Frontend("python", rich=False, widgets=False)
    kind = type(shell).__name__
    module = type(shell).__module__ or ""
    colab = "google.colab" in sys.modules or module.startswith("google.colab")
    kernel = getattr(shell, "kernel", None) is not None or kind == "ZMQInteractiveShell"
    if not (kernel or colab):
        # TerminalInteractiveShell, or a bare InteractiveShell (tests, scripts): no rich client
        return Frontend("ipython-terminal", rich=False, widgets=False)
    if colab:
        name = "colab"
    elif any(k.startswith("VSCODE_") for k in os.environ):
        name = "vscode"
    elif "KAGGLE_KERNEL_RUN_TYPE" in os.environ:
        name = "kaggle"
    else:
        name = "jupyter"
    return Frontend(name, rich=True, widgets=_widgets_importable())


def choose_renderer(requested: str | None = None, shell=None) -> str:
    """``requested`` (or ``$SLOTHNB_PANEL``) if given, else the richest the front end supports."""
    choice = requested or os.environ.get("SLOTHNB_PANEL") or None
    if choice is not None:
        if choice not in RENDERERS:
            from slothnb.errors import ConfigError

            raise ConfigError(f"panel renderer {choice!r} is not one of {', '.join(RENDERERS)}.")
        return choice
    front = detect_frontend(shell)
    if front.widgets:
        return "widgets"
    return "html" if front.rich else "text"
