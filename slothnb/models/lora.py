"""LoRA adapters through peft, validated up front, wired for memory-frugal training.

What this adds to ``peft.get_peft_model``:

- every bad option is a ``ConfigError`` that says what to pass instead (an unknown target module lists
  the ones the model has);
- ``random_state`` seeds the adapter init without disturbing the caller's RNG;
- ``"embed_tokens"`` / ``"lm_head"`` in ``target_modules`` (continued pre-training, new tokens) become
  fully trained modules (peft ``modules_to_save``). Memory choice: the trainable copy stays in the
  model's dtype on the model's device, next to the frozen original (kept so adapters can be disabled);
  no fp32 copy of the vocab matrix is made here (fp32 optimizer state, if wanted, is the trainer's call).
  With tied input/output embeddings the two trainable copies are kept tied (peft ``ensure_weight_tying``):
  training either one trains both, as in the base model;
- a 4-bit base gets what ``peft.prepare_model_for_kbit_training`` does that matters (frozen base,
  input grads for checkpointing) WITHOUT its upcast of every non-quantised weight to fp32;
- gradient checkpointing (``False`` / ``True`` / ``"slothnb"``) from ``slothnb.models.checkpointing``;
- a frozen, untied input embedding of 256 MiB or more moves to pinned host memory on CUDA
  (``slothnb.models.embedding_offload``; ``offload_embedding=False`` keeps it on the GPU);
- so does a frozen output head of 256 MiB or more while training with CUDA graphs, tied or not: each
  training forward copies it to the GPU for the loss only (``slothnb.models.head_offload``);
- ``model._slothnb_lora`` records the settings for the kernel-patched forwards and the savers.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
from torch import nn

from slothnb.errors import ConfigError, HardwareError
from slothnb.kernels.adapter_casts import pack_adapters
from slothnb.models.checkpointing import apply_gradient_checkpointing, normalize_mode
from slothnb.models import head_offload
from slothnb.models.embedding_offload import MIN_BYTES, offload_input_embedding, should_offload

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_TARGETS = ("qkv_proj", "gate_up_proj")  # Phi-3 style fused projections, used when the defaults are asked
FULLY_TRAINED = ("embed_tokens", "lm_head")  # target names trained as whole modules, not with adapters
BIAS_CHOICES = ("none", "all", "lora_only")
_LINEAR_TYPES = ("Linear", "Linear4bit", "Linear8bitLt", "Conv1D")


def _linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers LoRA can target (``q_proj``, ``down_proj``, ``lm_head``...)."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if name and type(m).__name__ in _LINEAR_TYPES}
    return sorted(names)


def _has_module(model: nn.Module, target: str) -> bool:
    return any(name == target or name.endswith("." + target) for name, _ in model.named_modules())


def is_4bit(model: nn.Module) -> bool:
    """True when the model holds bitsandbytes 4-bit layers (QLoRA)."""
    return any(type(m).__name__ == "Linear4bit" for m in model.modules())


def _ties_embeddings(model: nn.Module) -> bool:
    try:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return out is not None and inp is not None and out.weight is inp.weight


def _check_numbers(r, lora_alpha, lora_dropout, bias):
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"r={r!r}: the LoRA rank must be a positive integer (8, 16, 32, 64 are usual).")
    if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or lora_alpha <= 0:
        raise ConfigError(f"lora_alpha={lora_alpha!r} must be a positive number (commonly r or 2*r).")
    if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout={lora_dropout!r} must be in [0, 1); 0 is fastest "
                          "(the fused LoRA kernels are used only without dropout).")
    if bias not in BIAS_CHOICES:
        raise ConfigError(f"bias={bias!r} is not one of {BIAS_CHOICES}; 'none' is usual (and fastest).")


def _split_targets(model, target_modules, modules_to_save):
    """(adapter targets, fully trained modules), each checked against what the model has."""
    if isinstance(target_modules, str):
        target_modules = target_modules if target_modules == "all-linear" else [target_modules]
    if target_modules is None or (not isinstance(target_modules, str) and len(target_modules) == 0):
        raise ConfigError(f"target_modules is empty: pass names such as {list(DEFAULT_TARGETS)} or 'all-linear'.")
    save = list(modules_to_save or [])
    if not isinstance(target_modules, str) and tuple(target_modules) == DEFAULT_TARGETS:
        # the defaults mean "every attention and MLP projection": take the ones this architecture has
        target_modules = [t for t in DEFAULT_TARGETS + FUSED_TARGETS if _has_module(model, t)] or target_modules
    if isinstance(target_modules, str):
        targets = target_modules
    else:
        targets = []
        for t in target_modules:
            (save if t in FULLY_TRAINED else targets).append(t)
        available = _linear_names(model)
        missing = [t for t in targets if not _has_module(model, t)]
        if missing:
            raise ConfigError(f"target_modules {missing} do not exist in {type(model).__name__}. "
                              f"Its linear layers are {available}; 'embed_tokens' and 'lm_head' may be "
                              "added to train them fully.")
        if not targets:
            raise ConfigError("target_modules names only embed_tokens/lm_head: add at least one linear layer "
                              f"for the adapters, from {available}.")
    missing = [m for m in save if not _has_module(model, m)]
    if missing:
        raise ConfigError(f"modules_to_save {missing} do not exist in {type(model).__name__}.")
    return targets, list(dict.fromkeys(save))


def _loftq(loftq_config, model):
    """peft's LoftQConfig from what was passed, after checking LoftQ can run here."""
    from peft import LoftQConfig

    if is_4bit(model):
        raise ConfigError("LoftQ needs the 16-bit base model: it quantises the weights itself and starts the "
                          "adapters from the quantisation error. Load with load_in_4bit=False, or drop loftq_config.")
    if not torch.cuda.is_available():
        raise HardwareError("LoftQ quantises with bitsandbytes on a CUDA GPU and none is available: "
                            "drop loftq_config (the default LoRA init) or run on a GPU.")
    if isinstance(loftq_config, dict):
        loftq_config = LoftQConfig(**loftq_config)
    if loftq_config is True:
        loftq_config = LoftQConfig(loftq_bits=4)
    if not isinstance(loftq_config, LoftQConfig):
        raise ConfigError(f"loftq_config={loftq_config!r}: pass peft.LoftQConfig(loftq_bits=4) or a dict of it.")
    return loftq_config


def _lora_config(kw, **settings):
    from peft import LoraConfig

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(kw) - fields)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for get_peft_model; peft LoraConfig accepts e.g. "
                          "use_dora, layers_to_transform, rank_pattern, alpha_pattern, exclude_modules.")
    try:
        return LoraConfig(task_type="CAUSAL_LM", **settings, **kw)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"peft rejected the LoRA settings: {e}") from e


def _prepare_4bit(model: nn.Module) -> None:
    """The part of peft's prepare_model_for_kbit_training that matters, minus the fp32 upcast: freeze the
    base (the 4-bit weights never train) and leave every 16-bit weight in its dtype (an fp32 copy of the
    embeddings and norms would cost more memory than the 4-bit layers save on a small model)."""
    for p in model.parameters():
        p.requires_grad_(False)


def _enable_input_grads(hf_model: nn.Module) -> None:
    """Embedding outputs require grad so checkpointed layers see an input that needs grad."""
    if not getattr(hf_model, "_require_grads_hooks", None) and hasattr(hf_model, "enable_input_require_grads"):
        hf_model.enable_input_require_grads()


def _offload_embedding(hf_model: nn.Module, choice) -> bool:
    """Moves a frozen, untied input embedding to host memory (see ``embedding_offload``); True if done.
    ``"auto"`` does it on CUDA for tables of 256 MiB or more; ``True`` for any frozen untied CUDA table."""
    if choice is False:
        return False
    if not should_offload(hf_model, MIN_BYTES if choice == "auto" else 0):
        if choice is True:
            raise ConfigError("offload_embedding=True needs a frozen input embedding on a CUDA device that is not "
                              "tied to the output head: pass 'auto' to offload only where it applies.")
        return False
    offload_input_embedding(hf_model)
    return True


def _offload_head(hf_model: nn.Module, choice, graphs: bool) -> bool:
    """Moves a frozen output head to host memory while training (see ``head_offload``); True if done.
    ``"auto"`` does it on CUDA for heads of 256 MiB or more when the layers may run as CUDA graphs: their pool
    sits in the backward, which the head then leaves. Without graphs a step's peak is rarely in the backward
    and the copy buys little (H100, Llama-3.1-8B QLoRA: 6.23 -> 6.06 GiB at 2,048 tokens a step, 7.13 ->
    7.12 at 4,096). ``True``: any frozen, bias-free CUDA head."""
    if choice is False or (choice == "auto" and not graphs):
        return False
    if not head_offload.should_offload(hf_model, head_offload.MIN_BYTES if choice == "auto" else 0):
        if choice is True:
            raise ConfigError("offload_head=True needs a frozen, bias-free nn.Linear output head on a CUDA device "
                              "(not trained, no LoRA on it): pass 'auto' to offload only where it applies.")
        return False
    head_offload.offload_output_head(hf_model)
    return True


def get_peft_model(model, r=16, target_modules=DEFAULT_TARGETS, lora_alpha=16, lora_dropout=0.0, bias="none",
                   use_gradient_checkpointing="slothnb", random_state=3407, use_rslora=False, loftq_config=None,
                   modules_to_save=None, max_seq_length=None, init_lora_weights=True, **kw):
    """Add LoRA adapters to a transformers causal LM and make it ready to train; returns a ``PeftModel``.

    ``use_gradient_checkpointing``: False / True / "slothnb" (see ``slothnb.models.checkpointing``).
    Extra slothnb options in ``kw``: ``checkpoint_layers`` (decoder layer indices to checkpoint) or
    ``checkpoint_budget_gib`` (activation budget at ``max_seq_length``, see ``checkpoint_policy``);
    ``offload_embedding`` ("auto" | True | False): keep a frozen, untied input embedding in pinned host
    memory (saves its GPU copy, 0.98 GiB on Llama-3.1-8B; see ``slothnb.models.embedding_offload``);
    ``offload_head`` ("auto" | True | False): keep a frozen output head in pinned host memory while
    training, on the GPU only from each forward's start to its loss (see ``slothnb.models.head_offload``;
    "auto": with CUDA graphs; default from SLOTHNB_OFFLOAD_HEAD: 0 off, 1 on, else "auto");
    ``cuda_graphs`` (True | False | "adaptive" | "forward"; default ``SLOTHNB_CUDA_GRAPHS`` if set, else True
    for CUDA models of 0.2-4B parameters and "forward" above): with "slothnb" checkpointing, replay each
    checkpointed layer as CUDA graphs (for host-bound small models; see ``slothnb.models.layer_graphs``), or as
    many of them as the host needs, found while training ("adaptive", ``slothnb.models.graph_pacing``), or
    every second layer's forward alone ("forward": larger models, whose forward is where a slow host costs).
    Other ``kw`` go to peft's ``LoraConfig`` (e.g. ``use_dora``, ``layers_to_transform``).
    """
    import peft

    if isinstance(model, peft.PeftModel):
        raise ConfigError("this model already has LoRA adapters: call get_peft_model on the base model once, "
                          "or load the saved adapter with peft.PeftModel.from_pretrained.")
    _check_numbers(r, lora_alpha, lora_dropout, bias)
    mode = normalize_mode(use_gradient_checkpointing)
    checkpoint_layers = kw.pop("checkpoint_layers", None)
    checkpoint_budget_gib = kw.pop("checkpoint_budget_gib", None)
    offload_embedding = kw.pop("offload_embedding", "auto")
    offload_head = kw.pop("offload_head", {"0": False, "1": True}.get(os.environ.get("SLOTHNB_OFFLOAD_HEAD"), "auto"))
    if offload_head not in ("auto", True, False):
        raise ConfigError(f"offload_head={offload_head!r}: pass 'auto', True or False.")
    cuda_graphs = kw.pop("cuda_graphs", None)
    if offload_embedding not in ("auto", True, False):
        raise ConfigError(f"offload_embedding={offload_embedding!r}: pass 'auto', True or False.")
    if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length <= 0):
        raise ConfigError(f"max_seq_length={max_seq_length!r} must be a positive integer (tokens).")
    targets, save = _split_targets(model, target_modules, modules_to_save)
    quantized = is_4bit(model)
    if loftq_config is not None and loftq_config is not False:
        loftq_config = _loftq(loftq_config, model)
        init_lora_weights = "loftq"
    else:
        loftq_config = None
    tie = _ties_embeddings(model) and bool(set(save) & set(FULLY_TRAINED))
    config = _lora_config(
        kw, r=r, lora_alpha=lora_alpha, lora_dropout=float(lora_dropout), bias=bias, target_modules=targets,
        modules_to_save=save or None, use_rslora=use_rslora, init_lora_weights=init_lora_weights,
        **({"loftq_config": loftq_config} if loftq_config is not None else {}),
        **({"ensure_weight_tying": True} if tie else {}),
    )

    if quantized:
        _prepare_4bit(model)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # seeds the init only; the caller's RNG is left alone
        torch.manual_seed(random_state)
        peft_model = peft.get_peft_model(model, config)

    hf = peft_model.get_base_model()
    pack_adapters(_adapters_in_pack_order(peft_model))
    offloaded = _offload_embedding(hf, offload_embedding)
    chosen = apply_gradient_checkpointing(peft_model, mode, layers=checkpoint_layers,
                                          budget_gib=checkpoint_budget_gib, seq_len=max_seq_length,
                                          cuda_graphs=cuda_graphs)
    head_offloaded = _offload_head(hf, offload_head, getattr(hf, "_slothnb_cuda_graphs", False))
    if mode:
        _enable_input_grads(hf)
    settings = {
        "r": r, "lora_alpha": lora_alpha, "lora_dropout": float(lora_dropout), "bias": bias,
        "use_rslora": bool(use_rslora), "scaling": lora_alpha / (math.sqrt(r) if use_rslora else r),
        "target_modules": targets, "modules_to_save": save, "tied_embeddings": tie,
        "use_gradient_checkpointing": mode, "checkpointed_layers": chosen, "cuda_graphs": getattr(hf, "_slothnb_cuda_graphs", False),
        "offloaded_embedding": offloaded, "offloaded_head": head_offloaded, "random_state": random_state,
        "max_seq_length": max_seq_length, "loftq": loftq_config is not None, "quantized_4bit": quantized,
        # the fused LoRA kernels apply only when the adapter is a plain x @ A @ B * scale
        "fusable": lora_dropout == 0 and bias == "none" and not kw.get("use_dora", False),
    }
    hf._slothnb_lora = settings
    peft_model._slothnb_lora = settings
    return peft_model


def _adapters_in_pack_order(peft_model) -> list:
    """The trainable LoRA A and B matrices in the order ``pack_adapters`` lays them out.

    The packed adapters are cast with one launch per pass (``slothnb.kernels.lora``). The A matrices of
    one parent module come first and side by side (q, k, v, o of an attention; gate, up, down of an MLP).
    Projections that share an input (q/k/v, gate/up) then get ``x [A_q; A_k; A_v]^T`` from one matmul
    over a view, with no concatenation.
    """
    by_parent, bs = {}, []
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_A." in name:
            by_parent.setdefault(name.split(".lora_A.")[0].rpartition(".")[0], []).append(p)
        elif ".lora_B." in name:
            bs.append(p)
    return [p for group in by_parent.values() for p in group] + bs


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
