"""Model loading, patching, LoRA and generation (see docs/architecture.md).

Submodules are imported on use (``slothnb.models.loader``, ``.generation``...), so importing this
package stays cheap.
"""
