"""Pushing to the Hugging Face Hub: save into a temporary folder, then one upload_folder call.

The token goes straight to `HfApi` and nowhere else: it is never printed, logged or written to
disk (huggingface_hub's own login cache is not touched either).
"""
import os
import tempfile

from huggingface_hub import HfApi

from slothnb.errors import ConfigError, HardwareError


def _check_online(repo_id):
    if not isinstance(repo_id, str) or not repo_id.strip() or repo_id.count("/") > 1:
        raise ConfigError(f"repo_id {repo_id!r} is not a Hub repository name like 'username/my-model'.")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        raise HardwareError(f"Cannot push to {repo_id!r}: HF_HUB_OFFLINE is set, so the Hub cannot be "
                            "reached. Unset HF_HUB_OFFLINE (and check the network), or save locally instead.")


def upload_folder(folder, repo_id, token=None, private=True, commit_message="Upload with slothnb"):
    """Create the repository if needed and upload `folder` to it; returns the commit info."""
    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message=commit_message)


def push_to_hub_merged(model, repo_id, tokenizer=None, save_method="merged_16bit", token=None, private=True,
                       max_shard_size="5GB", commit_message="Upload model trained with slothnb"):
    """`save_pretrained_merged` into a temporary folder, then upload it to `repo_id`."""
    from slothnb.saving.merged import check_save_method, save_pretrained_merged

    check_save_method(save_method)
    _check_online(repo_id)
    with tempfile.TemporaryDirectory(prefix="slothnb-push-") as folder:
        save_pretrained_merged(model, folder, tokenizer, save_method=save_method, max_shard_size=max_shard_size)
        return upload_folder(folder, repo_id, token, private, commit_message)


def push_to_hub_gguf(model, repo_id, tokenizer, quantization_method="f16", token=None, private=True,
                     commit_message="Upload GGUF exported with slothnb"):
    """`save_pretrained_gguf` into a temporary folder, then upload the .gguf file to `repo_id`."""
    from slothnb.saving.gguf_export import check_quantization_method, save_pretrained_gguf

    check_quantization_method(quantization_method)
    _check_online(repo_id)
    with tempfile.TemporaryDirectory(prefix="slothnb-push-") as folder:
        save_pretrained_gguf(model, folder, tokenizer, quantization_method)
        return upload_folder(folder, repo_id, token, private, commit_message)
