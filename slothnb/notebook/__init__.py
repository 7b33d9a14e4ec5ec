"""The Jupyter layer: ``%load_ext slothnb`` magics, live panels, and the functions behind them.

Everything here is a face over the engine (``slothnb.fast_language_model``, ``slothnb.training``,
``slothnb.memory``, ``slothnb.models.generation``); the engine never imports this package.
"""
from slothnb.notebook.api import finetune_cell, load_model, parse_finetune_config, stream_to_display
from slothnb.notebook.panel import LivePanel, PanelState, render_html
from slothnb.notebook.vram import vram_report

__all__ = ["load_model", "finetune_cell", "parse_finetune_config", "stream_to_display", "vram_report",
           "PanelState", "LivePanel", "render_html", "load_ipython_extension", "unload_ipython_extension"]

_MAGIC_NAMES = {"line": ("load_model", "vram", "generate"), "cell": ("finetune", "generate")}


def load_ipython_extension(ipython):
    """Register the magics: %load_model, %%finetune, %vram, %generate / %%generate."""
    from slothnb.notebook.magics import SlothMagics

    ipython.register_magics(SlothMagics)


def unload_ipython_extension(ipython):
    """Remove the magics again (``%unload_ext slothnb``)."""
    manager = ipython.magics_manager
    for kind, names in _MAGIC_NAMES.items():
        for name in names:
            manager.magics[kind].pop(name, None)
    manager.registry.pop("SlothMagics", None)
