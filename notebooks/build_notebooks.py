"""Writes the example notebooks (without outputs) from the cell sources below.

    python notebooks/build_notebooks.py

Edit the cells here, not in the .ipynb files, so the notebooks stay output-free and reviewable.
``# NBVAL_IGNORE_OUTPUT`` marks live cells (timings, panels, sampled text); ``# NBVAL_CHECK_OUTPUT``
marks the deterministic cells that CI compares under ``--nbval-lax``.
"""
from pathlib import Path

import nbformat

HERE = Path(__file__).parent
IGNORE, CHECK = "# NBVAL_IGNORE_OUTPUT\n", "# NBVAL_CHECK_OUTPUT\n"

SETUP = IGNORE + """%load_ext slothnb
import torch
print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU run)")"""

NOTEBOOKS = {}

NOTEBOOKS["01_continued_pretraining.ipynb"] = [
    ("md", """# 1. Continued pre-training on raw text (Shakespeare)

Teach a small model the style of a corpus: LoRA on every projection **plus** `embed_tokens` and
`lm_head` trained fully, at a lower *embedding learning rate* (2-10x below the LoRA rate) so the
embeddings move gently. Runs on CPU in a few minutes with the embedded SmolLM2-135M; on a GPU
raise `max_steps` and `max_seq_length` for a real run."""),
    ("code", SETUP),
    ("code", """from slothnb.data import fetch_shakespeare, shakespeare_files
import datasets

fetch_shakespeare()  # a no-op once the corpus is cached (python -m slothnb.data fetch)
play = shakespeare_files()[0]
text = play.read_text(encoding="utf-8")
start = text.index("ACT I")
paragraphs = [p.strip() for p in text[start:start + 40_000].split("\\n\\n") if len(p.strip()) > 80]
dataset = datasets.Dataset.from_dict({"text": paragraphs})"""),
    ("code", CHECK + """print(play.name, len(dataset) > 20)""", 'alls_well_that_ends_well_gut.txt True\n'),
    ("code", IGNORE + """%load_model smollm2-135m --max-seq-length 128"""),
    ("md", "Before training: what does the model write after a speaker's name?"),
    ("code", IGNORE + """%generate --raw --max-new-tokens 40 KING HENRY. Now, lords,"""),
    ("md", """Add LoRA to the projections and train the embeddings fully (`embed_tokens`, `lm_head` go to
peft's `modules_to_save`)."""),
    ("code", """from slothnb import FastLanguageModel

model = FastLanguageModel.get_peft_model(
    model, r=16, lora_alpha=16,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                    "embed_tokens", "lm_head"])"""),
    ("code", CHECK + """trainable = sorted({part for n, p in model.named_parameters() if p.requires_grad
                    for part in ("embed_tokens", "lm_head") if part in n})
print("fully trained:", trainable)""", "fully trained: ['embed_tokens']\n"),
    ("code", IGNORE + """%%finetune --output outputs/shakespeare
max_steps: 12
learning_rate: 2.0e-4
embedding_learning_rate: 2.0e-5
per_device_train_batch_size: 1
gradient_accumulation_steps: 1
warmup_steps: 2
max_seq_length: 128"""),
    ("code", CHECK + """losses = [row["loss"] for row in finetune_result.history if "loss" in row]
print(len(losses), "logged losses; interrupted:", finetune_result.interrupted)""", '12 logged losses; interrupted: False\n'),
    ("md", "After training:"),
    ("code", IGNORE + """%generate --raw --max-new-tokens 40 KING HENRY. Now, lords,"""),
    ("md", "Memory at each stage (load, LoRA added, training, generation):"),
    ("code", IGNORE + """%vram --plot"""),
]

NOTEBOOKS["02_chat_sft.ipynb"] = [
    ("md", """# 2. Chat fine-tuning, trained on the answers only

The chatterbot corpus gives short user/assistant conversations. `train_on_responses_only: true`
masks every prompt token (-100) so the loss comes only from the assistant's replies."""),
    ("code", SETUP),
    ("code", """from slothnb.data import fetch_chatterbot, load_chatterbot_dataset

fetch_chatterbot()
dataset = load_chatterbot_dataset().select(range(64))"""),
    ("code", CHECK + """print(dataset[0]["messages"][0]["role"], "->", dataset[0]["messages"][1]["role"])""", 'user -> assistant\n'),
    ("code", IGNORE + """%load_model smollm2-135m --max-seq-length 128"""),
    ("code", CHECK + """print(tokenizer.apply_chat_template(dataset[0]["messages"][:2], tokenize=False).count("<|im_start|>"))""", '3\n'),
    ("code", IGNORE + """%%finetune --output outputs/chat
max_steps: 10
learning_rate: 2.0e-4
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
warmup_steps: 1
max_seq_length: 128
train_on_responses_only: true"""),
    ("md", "The labels of one training row: prompt tokens are masked, the reply is kept."),
    ("code", CHECK + """row = finetune_result.trainer.train_dataset[0]
masked = sum(1 for x in row["labels"] if x == -100)
print("some masked:", masked > 0, "| some trained:", masked < len(row["labels"]))""", 'some masked: True | some trained: True\n'),
    ("code", IGNORE + """%%generate --max-new-tokens 40
Hello! How are you today?"""),
    ("code", IGNORE + """%vram"""),
]

NOTEBOOKS["03_memory_walkthrough.ipynb"] = [
    ("md", """# 3. Where the memory goes

Weights, a forward pass, LoRA adapters, optimizer state, and the activations saved for backward
with gradient checkpointing off, on, and offloaded (slothnb's mode). On a GPU `%vram` shows the
allocator's view of each stage; the bytes below are counted exactly on any device (tensors saved
for backward are counted through `torch.autograd.graph.saved_tensors_hooks`)."""),
    ("code", SETUP),
    ("code", IGNORE + """%vram --reset
%load_model smollm2-135m --max-seq-length 128"""),
    ("code", """from slothnb import FastLanguageModel
from slothnb.memory import record_stage
from slothnb.models.checkpointing import apply_gradient_checkpointing

MIB = 2**20
def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)

device = next(model.parameters()).device
batch = tokenizer(["To be, or not to be, that is the question: " * 6] * 2, return_tensors="pt",
                  truncation=True, max_length=128).to(device)
batch["labels"] = batch["input_ids"].clone()
sizes = {"weights": nbytes(model.parameters())}
with torch.no_grad():
    model(**batch)
record_stage("forward (no grad)")"""),
    ("code", """model = FastLanguageModel.get_peft_model(model, r=16, use_gradient_checkpointing=False)
record_stage("lora_added")
sizes["LoRA adapters"] = nbytes(p for p in model.parameters() if p.requires_grad)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

def saved_for_backward(mode):
    # bytes autograd keeps for backward in one training step, under a checkpointing mode
    apply_gradient_checkpointing(model, mode)
    model.train()
    total = [0]
    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    record_stage(f"train step, checkpointing={mode}")
    return total[0]

for mode in (False, True, "slothnb"):
    sizes[f"activations, checkpointing={mode}"] = saved_for_backward(mode)
sizes["optimizer state (AdamW)"] = sum(
    nbytes(v for v in s.values() if torch.is_tensor(v) and v.dim() > 0) for s in optimizer.state.values())"""),
    ("code", CHECK + """off, on = sizes["activations, checkpointing=False"], sizes["activations, checkpointing=True"]
print("checkpointing saves activation memory:", on < off)
print("optimizer state is 2x the adapters:", abs(sizes["optimizer state (AdamW)"] / sizes["LoRA adapters"] - 2) < 0.01)""", 'checkpointing saves activation memory: True\noptimizer state is 2x the adapters: True\n'),
    ("code", IGNORE + """import matplotlib.pyplot as plt

for name, value in sizes.items():
    print(f"{name:40s} {value / MIB:9.1f} MiB")
fig, ax = plt.subplots(figsize=(7, 3))
ax.barh(list(sizes)[::-1], [v / MIB for v in sizes.values()][::-1], color="#37b24d")
ax.set_xlabel("MiB")
ax.set_title("memory by component")
plt.show()"""),
    ("md", "The recorder's view of the same stages (GPU allocator on a GPU, process memory on CPU):"),
    ("code", IGNORE + """%vram --plot"""),
    ("md", """**Speed for memory, the other way round.** On a GPU a small model's step is bound by the host
(Python and kernel launches), not by the GPU. `get_peft_model(..., cuda_graphs=True)` (or
`cuda_graphs: true` in `%%finetune`) replays each checkpointed layer as CUDA graphs: on an H100 the
Llama-3.2-1B shape trains 2x faster, and pays for it with a graph memory pool (0.55 GiB there) that
`%vram` shows under *reserved* and in NVML's figure, not under *allocated*. See `docs/benchmarks.md`."""),
]

NOTEBOOKS["04_dpo.ipynb"] = [
    ("md", """# 4. Preference tuning with DPO

trl's `DPOTrainer` on a slothnb model with LoRA. With a peft model trl needs no separate reference
model: the base (adapters disabled) is the reference. The preference pairs are built from the
chatterbot corpus: the real answer is *chosen*, an answer to another question is *rejected*."""),
    ("code", SETUP),
    ("code", """from slothnb.data import fetch_chatterbot, load_chatterbot_dataset
import datasets

fetch_chatterbot()
chats = load_chatterbot_dataset().select(range(40))
pairs = []
for i, row in enumerate(chats):
    other = chats[(i + 7) % len(chats)]["messages"]
    pairs.append({"prompt": [row["messages"][0]], "chosen": [row["messages"][1]], "rejected": [other[1]]})
preferences = datasets.Dataset.from_list(pairs)"""),
    ("code", CHECK + """print(len(preferences), preferences[0]["chosen"][0]["role"])""", '40 assistant\n'),
    ("code", IGNORE + """%load_model smollm2-135m --max-seq-length 128
from slothnb import FastLanguageModel
model = FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing=False)"""),
    ("code", IGNORE + """from trl import DPOConfig, DPOTrainer
from slothnb.notebook import LivePanel, PanelState
from slothnb.notebook.api import PanelCallback

dtype = next(model.parameters()).dtype  # bf16/fp16 on a GPU, fp32 on CPU
args = DPOConfig(output_dir="outputs/dpo", max_steps=6, per_device_train_batch_size=2, learning_rate=5e-5,
                 beta=0.1, max_length=128, logging_steps=1, report_to="none", save_strategy="no",
                 bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, disable_tqdm=True)
trainer = DPOTrainer(model=model, args=args, train_dataset=preferences, processing_class=tokenizer)
panel = LivePanel(PanelState(title="DPO", total_steps=args.max_steps))
trainer.add_callback(PanelCallback(panel))
output = trainer.train()"""),
    ("code", CHECK + """rows = [r for r in trainer.state.log_history if "rewards/chosen" in r]
print(len(rows), "logged steps with rewards")""", '6 logged steps with rewards\n'),
    ("code", IGNORE + """%%generate --max-new-tokens 30
What is your favorite book?"""),
]

NOTEBOOKS["05_export.ipynb"] = [
    ("md", """# 5. Export: merge, GGUF, reload, compare

A short LoRA run, then the adapters are merged into a 16-bit checkpoint and written as GGUF; both
are loaded back and their logits compared with the LoRA model's."""),
    ("code", SETUP),
    ("code", IGNORE + """%load_model smollm2-135m --max-seq-length 64
import datasets
dataset = datasets.Dataset.from_dict({"text": ["slothnb exports merged models and GGUF files."] * 16})"""),
    ("code", IGNORE + """%%finetune --output outputs/export
max_steps: 3
learning_rate: 1.0e-3
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
warmup_steps: 0
max_seq_length: 64"""),
    ("code", """from slothnb import FastLanguageModel

prompt = tokenizer("slothnb exports merged models", return_tensors="pt")
def logits_of(m):
    m.eval()
    with torch.no_grad():
        return m(**{k: v.to(next(m.parameters()).device) for k, v in prompt.items()}).logits.float().cpu()

reference = logits_of(model)
merged_dir = model.save_pretrained_merged("outputs/export/merged", tokenizer, save_method="merged_16bit")
gguf_file = model.save_pretrained_gguf("outputs/export/gguf", tokenizer, quantization_method="f16")"""),
    ("code", IGNORE + """merged, _ = FastLanguageModel.from_pretrained(str(merged_dir), max_seq_length=64)
from_gguf, _ = FastLanguageModel.from_pretrained(str(gguf_file), max_seq_length=64)
diff_merged = (logits_of(merged) - reference).abs().max().item()
diff_gguf = (logits_of(from_gguf) - reference).abs().max().item()
print(f"max |logit difference|: merged {diff_merged:.4f}, GGUF f16 {diff_gguf:.4f}")"""),
    ("code", CHECK + """scale = reference.abs().max().item()
print("merged matches:", diff_merged < 0.02 * scale, "| GGUF f16 matches:", diff_gguf < 0.02 * scale)
print("same next token:", bool((logits_of(merged)[0, -1].argmax() == reference[0, -1].argmax()).item()))""", 'merged matches: True | GGUF f16 matches: True\nsame next token: True\n'),
]


def build() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        for kind, source, *expected in cells:
            if kind == "md":
                nb.cells.append(nbformat.v4.new_markdown_cell(source))
                continue
            cell = nbformat.v4.new_code_cell(source)
            # a cell magic must be the first line: its nbval marker goes into the cell's tags
            for marker, tag in ((IGNORE, "nbval-ignore-output"), (CHECK, "nbval-check-output")):
                if source.startswith(marker) and source[len(marker):].startswith("%%"):
                    cell.source = source[len(marker):]
                    cell.metadata["tags"] = [tag]
            if expected:  # nbval compares only cells that look run: give them a count
                cell.execution_count = len(nb.cells)
                cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=expected[0])]
            nb.cells.append(cell)
        for i, cell in enumerate(nb.cells):
            cell["id"] = f"c{i:02d}"
        nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    build()
