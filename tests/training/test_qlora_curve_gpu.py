"""50 QLoRA steps on an 8B-shaped model: slothnb's loss curve matches transformers + peft.

Needs the GPU machine and the random-initialised Llama-3.1-8B-shaped checkpoint that
`peers/make_models.py` builds (`bash bench/run_gpu.sh model:8b`); skipped otherwise.

Both systems load the same NF4 checkpoint, get LoRA r16 on all seven projections with the
*same* initial adapter weights (copied across), see the same batches (tokens drawn from a
Zipf-like distribution, so there is something to learn and the loss really moves) and take
AdamW steps at the same learning rate. bf16 rounding differs between the fused kernels and
the reference path, so the curves are compared within a tolerance, not bit for bit.
"""
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

MODEL = os.path.join(os.environ.get("ANCHOR_MODEL_ROOT", "/tmp/anchor_models"), "rand-llama-8b")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS, BATCH, SEQ, LR = 50, 1, 1024, 2e-4


def batches(vocab):
    g = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
    return [torch.multinomial(weights, BATCH * SEQ, replacement=True, generator=g).view(BATCH, SEQ)
            for _ in range(STEPS)]


def train(model, data, lora_state):
    model.load_state_dict(lora_state, strict=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    losses = []
    for x in data:
        x = x.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def lora_weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


@pytest.mark.skipif(not os.path.isdir(MODEL), reason=f"no 8B-shaped checkpoint at {MODEL} (bench/run_gpu.sh model:8b)")
def test_50_qlora_steps_match_transformers_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from slothnb import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(MODEL, max_seq_length=SEQ, dtype=torch.bfloat16, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, target_modules=TARGETS,
                                             use_gradient_checkpointing="slothnb", random_state=3407)
    FastLanguageModel.for_training(model)
    # B starts at zero in LoRA; give it a small random start so the first steps already differ from the base.
    init = lora_weights(model)
    g = torch.Generator(device="cuda").manual_seed(1)
    init = {k: (torch.randn(v.shape, generator=g, device=v.device, dtype=v.dtype) * 1e-3 if "lora_B" in k else v)
            for k, v in init.items()}
    data = batches(model.config.vocab_size)
    ours = train(model, data, init)
    del model
    torch.cuda.empty_cache()

    ref = AutoModelForCausalLM.from_pretrained(
        MODEL, dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True))
    ref.config.use_cache = False
    ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref.enable_input_require_grads()
    ref = get_peft_model(ref, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                         task_type="CAUSAL_LM"))
    ref.train()
    theirs = train(ref, data, {k: v.to(ref.state_dict()[k].dtype) for k, v in init.items()})

    ours_t, theirs_t = torch.tensor(ours), torch.tensor(theirs)
    print("slothnb", [round(v, 4) for v in ours])
    print("hf+peft", [round(v, 4) for v in theirs])
    assert theirs_t[-10:].mean() < theirs_t[:3].mean() - 0.5, "the reference did not learn: the test data is too easy/hard"
    # bf16 reductions differ by a few 1e-3: the step-0 forward (no update yet, deterministic) differs by
    # 4.2e-3, the adapter term being summed in fp32 inside the base GEMM here and rounded to bf16 by peft.
    # Later steps also move between runs of the SAME system (cuDNN's attention backward accumulates with
    # atomics): the reference's step-2 loss was 12.5726 and 12.5748 in two runs (session 15, call 7), and
    # at 5e-3 this test failed once with slothnb's session-15 paths switched off, once passed with them on.
    assert torch.allclose(ours_t[:1], theirs_t[:1], atol=5e-3, rtol=0), (ours[:1], theirs[:1])
    assert torch.allclose(ours_t[:3], theirs_t[:3], atol=1e-2, rtol=0), (ours[:3], theirs[:3])
    assert (ours_t - theirs_t).abs().max() < 0.03, (ours, theirs)
