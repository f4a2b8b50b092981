"""Parameter counts of SD3.5-Medium and FLUX.1-dev, built on the ``meta`` device from their published configs.

No download and no memory: ``torch.device("meta")`` builds every module with shapes but no storage, so the
counts are exact for the architecture the config describes. The configs are written out below as the model
repositories publish them (``stabilityai/stable-diffusion-3.5-medium`` and ``black-forest-labs/FLUX.1-dev``,
``<component>/config.json``; the fields that change the parameter count). LoRA counts are for this project's
targets (``diffusion_mdp.lora.LORA_TARGET_MODULES``: ``to_q``, ``to_k``, ``to_v``, ``to_out.0``) and for
Flow-GRPO's SD3 targets (the same plus the text stream's ``add_q_proj``, ``add_k_proj``, ``add_v_proj``,
``to_add_out``): a LoRA of rank r on a ``Linear(i, o)`` has r · (i + o) parameters.

    python benchmarks/flow_model_sizes.py            # the table used in docs/distributed.md
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

# stabilityai/stable-diffusion-3.5-medium transformer/config.json
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}
# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
# Both pipelines' vae/config.json: SD3's and FLUX's 16-channel AutoencoderKL without quant convs.
VAE_16CH: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# text_encoder (CLIP ViT-L/14 text tower), text_encoder_2 (OpenCLIP bigG text tower), T5 v1.1 XXL encoder.
CLIP_L: dict[str, Any] = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              projection_dim=768, vocab_size=49408, max_position_embeddings=77)  # fmt: skip
CLIP_G: dict[str, Any] = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                              projection_dim=1280, vocab_size=49408, max_position_embeddings=77)  # fmt: skip
T5_XXL: dict[str, Any] = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                              feed_forward_proj="gated-gelu")  # fmt: skip

THIS_PROJECT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FLOW_GRPO_TARGETS = (*THIS_PROJECT_TARGETS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_buffers(module: torch.nn.Module) -> int:
    """Elements of the buffers saved with the weights (SD3's position-embedding table is one: 384² × 1536)."""
    persistent = set(module.state_dict().keys())
    return sum(b.numel() for name, b in module.named_buffers() if name in persistent)


def lora_count(module: torch.nn.Module, targets: tuple[str, ...], rank: int) -> int:
    """Parameters of a rank-``rank`` LoRA on every ``Linear`` whose name ends with a target (peft's matching)."""
    total = 0
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (sub.in_features + sub.out_features)
    return total


def build() -> dict[str, torch.nn.Module]:
    """Every component on the meta device (shapes only)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        return {
            "SD3.5-M transformer": SD3Transformer2DModel.from_config(SD35_MEDIUM_TRANSFORMER),
            "FLUX.1-dev transformer": FluxTransformer2DModel.from_config(FLUX_DEV_TRANSFORMER),
            "CLIP-L (with projection, SD3)": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
            "CLIP-L (FLUX)": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            "CLIP-G (with projection)": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
            "T5-XXL encoder": T5EncoderModel(T5Config(**T5_XXL)),
            "VAE (16 channels)": AutoencoderKL.from_config(VAE_16CH),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="4,32", help="LoRA ranks to count (comma separated)")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    models = build()
    print("| component | parameters | + saved buffers |")
    print("|---|---|---|")
    for name, model in models.items():
        print(f"| {name} | {count(model) / 1e6:,.1f} M | {count_buffers(model) / 1e6:,.1f} M |")
    print()
    print("| transformer | LoRA targets | " + " | ".join(f"rank {r}" for r in ranks) + " |")
    print("|---|---|" + "---|" * len(ranks))
    for name in ("SD3.5-M transformer", "FLUX.1-dev transformer"):
        for label, targets in (("this project", THIS_PROJECT_TARGETS), ("Flow-GRPO", FLOW_GRPO_TARGETS)):
            cells = " | ".join(f"{lora_count(models[name], targets, r) / 1e6:.2f} M" for r in ranks)
            print(f"| {name} | {label} | {cells} |")


if __name__ == "__main__":
    main()
