"""Tiny models and a real byte-level BPE tokenizer, built in-process for the saving tests."""
import pytest
import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sloths fine-tune language models slowly but with very little memory.",
    "A merged model must give the same logits as the model with its adapters.",
    "GGUF files carry the tokenizer, the chat template and the weights together.",
] * 20


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def tiny_base(tokenizer, arch="llama", tie=False, dtype=torch.float32, seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():  # random norms, so a wrongly mapped norm cannot hide
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def tiny_lora(tokenizer, arch="llama", tie=False, dtype=torch.float32, modules_to_save=None, seed=0):
    """A LoRA model whose adapters are far from zero, so merged != base and a bad merge shows."""
    from peft import LoraConfig, get_peft_model

    base = tiny_base(tokenizer, arch, tie, dtype, seed)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, modules_to_save=modules_to_save,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


@pytest.fixture
def sample_ids(tokenizer):
    return torch.tensor([tokenizer("The lazy sloth merges adapters into the model.")["input_ids"]])
