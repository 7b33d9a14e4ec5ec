"""Training: SlothTrainer (trl SFTTrainer + embedding lr, exact loss, guards), data helpers, finetune()."""
from slothnb.training.chat import CHAT_TEMPLATES, apply_chat_template, detect_markers, train_on_responses_only
from slothnb.training.data import raw_text_dataset
from slothnb.training.guards import check_trainable_labels
from slothnb.training.recipe import FinetuneConfig, FinetuneResult, finetune
from slothnb.training.trainer import SlothTrainer, SlothTrainingArguments

__all__ = [
    "SlothTrainer", "SlothTrainingArguments", "raw_text_dataset", "apply_chat_template", "CHAT_TEMPLATES",
    "detect_markers", "train_on_responses_only", "check_trainable_labels", "FinetuneConfig", "FinetuneResult",
    "finetune",
]
