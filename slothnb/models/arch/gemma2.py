"""Gemma 2: Gemma plus pre/post feed-forward norms, attention and final-logit soft-capping,
query_pre_attn_scalar (HF's ``self.scaling``) and alternating sliding-window layers (in HF's masks)."""
from slothnb.models.arch.common import ArchSpec, patch_layers

SPEC = ArchSpec(
    norm_offset=1.0,
    layer_norms=("input_layernorm", "post_attention_layernorm",
                 "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    softcaps=True,
    mlp_output_to_residual=False,  # post_feedforward_layernorm reads the MLP output
)


def patch(model) -> None:
    patch_layers(model, SPEC)
