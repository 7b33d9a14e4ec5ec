"""Automatic RoPE scaling when ``max_seq_length`` exceeds the context a model was trained on.

Fine-tuning at the longer length is what makes scaled positions work, so plain RoPE gets *linear*
scaling (positions divided by the factor, Chen et al. 2023 "Extending Context Window ... via
Positional Interpolation"); a model that already scales (linear, dynamic, yarn, llama3) keeps its
type and has its factor multiplied. Transformers 5 keeps these in ``config.rope_parameters``
(``rope_scaling`` is an alias), sometimes one dict per attention type (Gemma 3): only the full
attention is scaled there, sliding windows never see long distances.
"""
from __future__ import annotations

import copy
import logging

from slothnb.errors import ConfigError

logger = logging.getLogger("slothnb")

_SCALABLE = ("linear", "dynamic", "yarn", "llama3")


def check_max_seq_length(max_seq_length) -> int:
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length <= 0:
        raise ConfigError(f"max_seq_length must be a positive integer (e.g. 2048), got {max_seq_length!r}.")
    return max_seq_length


def _scaled(params: dict, ratio: float, trained: int) -> dict:
    params = dict(params)
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        params["rope_type"] = "linear"
        params["factor"] = ratio
    elif kind in _SCALABLE:
        params["factor"] = float(params.get("factor", 1.0)) * ratio
        if kind in ("yarn", "dynamic"):
            params.setdefault("original_max_position_embeddings", trained)
    else:
        raise ConfigError(
            f"this model uses RoPE type {kind!r}, which slothnb cannot stretch automatically; "
            f"use max_seq_length <= {trained} (its trained context)."
        )
    params.pop("type", None)
    return params


def apply_rope_scaling(config, max_seq_length: int) -> str | None:
    """Scale ``config``'s RoPE in place so ``max_seq_length`` positions fit; returns the one-line notice, or None."""
    check_max_seq_length(max_seq_length)
    trained = getattr(config, "max_position_embeddings", None)
    if trained is None or max_seq_length <= trained:
        return None
    ratio = max_seq_length / trained
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = getattr(config, "rope_scaling", None)
    params = copy.deepcopy(params) if params else {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params["full_attention"] = _scaled(params["full_attention"], ratio, trained)
        kind, factor = params["full_attention"]["rope_type"], params["full_attention"]["factor"]
    else:
        params = _scaled(params, ratio, trained)
        kind, factor = params["rope_type"], params["factor"]
    if hasattr(config, "rope_parameters"):
        config.rope_parameters = params
    else:
        config.rope_scaling = params
    config.max_position_embeddings = max_seq_length
    notice = (f"slothnb: max_seq_length {max_seq_length} > trained context {trained}: "
              f"{kind} RoPE scaling, factor {factor:g}.")
    logger.warning(notice)
    return notice
