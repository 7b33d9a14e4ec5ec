"""``FastLanguageModel``: the one class users touch (the Unsloth-style facade over ``slothnb.models``).

    model, tokenizer = FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=2048, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16)
    FastLanguageModel.for_inference(model)   # eval, KV cache, left padding
    FastLanguageModel.for_training(model)    # train, checkpointing back, right padding

The returned model is a normal transformers model (kernel-patched per instance), so anything that
takes a transformers model takes it.
"""
from __future__ import annotations

import logging

from slothnb import memory, python_gc, saving
from slothnb.models import checkpointing, lora, patching
from slothnb.models.loader import load_model_and_tokenizer

logger = logging.getLogger("slothnb")


def _hf_model(model):
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _tokenizer_of(model, tokenizer=None):
    return tokenizer if tokenizer is not None else getattr(_hf_model(model), "_slothnb_tokenizer", None)


class FastLanguageModel:
    """Static facade: ``from_pretrained``, ``get_peft_model``, ``for_inference``, ``for_training``."""

    @staticmethod
    def from_pretrained(model_name="smollm2-135m", max_seq_length: int = 2048, dtype=None, load_in_4bit: bool = False,
                        token=None, device_map=None, trust_remote_code: bool = False, fix_tokenizer: bool = True,
                        patch: bool = True, attn_implementation: str | None = "sdpa", **kw):
        """Load ``(model, tokenizer)`` from a local folder, a ``.gguf`` file, a hub name or ``"smollm2-135m"``.

        ``dtype=None`` picks bf16/fp16 on CUDA, fp32 on CPU; ``load_in_4bit`` uses NF4 + double quant;
        a ``max_seq_length`` past the trained context turns on RoPE scaling. ``patch`` binds the Triton
        kernels; ``fix_tokenizer`` repairs pad/eos/BOS (see ``slothnb.models.tokenizer_fixes``).
        """
        python_gc.unfreeze()  # a model frozen by an earlier for_training and dropped since can be collected
        model, tokenizer = load_model_and_tokenizer(
            model_name, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit, token=token,
            device_map=device_map, trust_remote_code=trust_remote_code, fix_tokenizer=fix_tokenizer,
            attn_implementation=attn_implementation, **kw)
        model._slothnb_patched = bool(patch and patching.patch_model(model))
        saving.attach_saving_methods(model)
        memory.record_stage("load")
        return model, tokenizer

    @staticmethod
    def get_peft_model(model, r: int = 16, target_modules=None, lora_alpha: int = 16, lora_dropout: float = 0.0,
                       bias: str = "none", use_gradient_checkpointing="slothnb", random_state: int = 3407,
                       use_rslora: bool = False, loftq_config=None, modules_to_save=None, max_seq_length=None, **kw):
        """Wrap ``model`` with LoRA adapters (delegates to ``slothnb.models.lora.get_peft_model``)."""
        if target_modules is not None:
            kw["target_modules"] = target_modules
        if max_seq_length is None:
            max_seq_length = getattr(model, "max_seq_length", None)
        return lora.get_peft_model(model, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
                              use_gradient_checkpointing=use_gradient_checkpointing, random_state=random_state,
                              use_rslora=use_rslora, loftq_config=loftq_config, modules_to_save=modules_to_save,
                              max_seq_length=max_seq_length, **kw)

    @staticmethod
    def for_inference(model, tokenizer=None):
        """Eval mode (dropout off), KV cache on, checkpointing off (remembered), left padding for batches."""
        hf = _hf_model(model)
        if checkpointing.is_checkpointing(hf):
            hf._slothnb_saved_checkpointing = getattr(hf, "_slothnb_checkpointing", True) or True
            checkpointing.apply_gradient_checkpointing(model, False)
        model.eval()
        hf.config.use_cache = True
        if getattr(hf, "generation_config", None) is not None:
            hf.generation_config.use_cache = True
        tok = _tokenizer_of(model, tokenizer)
        if tok is not None:
            tok.padding_side = "left"
        return model

    @staticmethod
    def for_training(model, tokenizer=None, use_gradient_checkpointing=None):
        """Train mode, KV cache off, the checkpointing that ``for_inference`` switched off back on, right padding;
        the objects alive now are frozen out of Python's full collections (``slothnb.python_gc``)."""
        hf = _hf_model(model)
        mode = use_gradient_checkpointing
        if mode is None:
            mode = getattr(hf, "_slothnb_saved_checkpointing", None)
        if mode or use_gradient_checkpointing is not None:
            checkpointing.apply_gradient_checkpointing(model, mode)
        hf._slothnb_saved_checkpointing = None
        model.train()
        hf.config.use_cache = False
        tok = _tokenizer_of(model, tokenizer)
        if tok is not None:
            tok.padding_side = "right"
        python_gc.freeze_for_training()
        return model
