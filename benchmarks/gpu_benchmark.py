"""Stable Diffusion 1.5 at real size on a GPU: sampling images/s, training s per epoch, peak memory.

Builds SD 1.5's UNet, VAE and CLIP text encoder from their published configurations with random weights (no
download: the cost of a step does not depend on the weights), at 512×512 (latents 4×64×64), and runs this
project's policy (:class:`diffusion_mdp.policy.DiffusionPolicy`, the stochastic DDIM step with its log-prob)
the way the agents do:

- **sampling**: ``--sample-batch`` prompts, ``--steps`` DDIM steps with classifier-free guidance (one UNet call
  on the batch of 2 × sample-batch), then the VAE decode; reported as images/s;
- **training**: ``--train-batch`` trajectories per minibatch, one forward + backward of the per-step policy
  loss per (minibatch, timestep), one AdamW step per minibatch; ``--train-steps`` such forward/backward
  passes are timed and the epoch is *extrapolated* to ``--samples-per-epoch`` × ``--steps`` of them, plus the
  sampling of those samples (the paper's epoch: 256 samples × 50 steps);
- for LoRA (rank 4 on the attention projections; the frozen UNet in the low precision, the adapter in
  float32) and full fine-tuning (float32 weights under autocast), at fp16 and bf16 autocast, with and
  without gradient checkpointing; peak GPU memory is ``torch.cuda.max_memory_allocated`` per configuration
  (on CPU: the process's peak RSS so far, which only grows).

``--tiny`` scales every config down (64×64 images, 3 steps, narrow widths) so that the script runs on a CPU in
the test suite; its numbers mean nothing. Prints a Markdown table; ``--json`` also writes the rows.

    python benchmarks/gpu_benchmark.py                      # on a CUDA machine: SD 1.5 size, 512×512, 50 steps
    python benchmarks/gpu_benchmark.py --tiny --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

FIELDS = (
    "mode",
    "precision",
    "gradient_checkpointing",
    "sampling_images_per_s",
    "train_step_s",
    "training_s_per_epoch",
    "peak_memory_mib",
)


def sd15_configs(tiny: bool) -> dict[str, Any]:
    """UNet / VAE / text-encoder kwargs of SD 1.5 (``tiny``: the same layout, scaled down)."""
    if tiny:
        return {
            "image_size": 64,
            "unet": {
                "block_out_channels": (32, 32, 64, 64),
                "layers_per_block": 1,
                "cross_attention_dim": 32,
                "attention_head_dim": 8,
                "norm_num_groups": 8,
            },
            "vae": {"block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 8},
            "text": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "max_position_embeddings": 16,
                "vocab_size": 1000,
            },
        }
    return {  # stable-diffusion-v1-5/{unet,vae,text_encoder}/config.json
        "image_size": 512,
        "unet": {
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32},
        "text": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "vocab_size": 49408,
        },
    }


def build_components(tiny: bool, device: torch.device) -> Any:
    """SD 1.5's architecture with random weights, as :class:`DiffusionComponents`."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusion_mdp.models import DiffusionComponents
    from diffusion_mdp.testing import REFERENCE_WORDS, SD_SCHEDULER_CONFIG
    from diffusion_mdp.tokenizer import build_word_tokenizer

    cfg = sd15_configs(tiny)
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(REFERENCE_WORDS, model_max_length=cfg["text"]["max_position_embeddings"])
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **cfg["text"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=cfg["image_size"] // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        **cfg["unet"],
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=cfg["image_size"],
        **cfg["vae"],
    )
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    return DiffusionComponents(unet, vae, text_encoder, tokenizer, scheduler, "sd15-random").to(device)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace, mode: str, precision: str, checkpointing: bool) -> dict[str, Any]:
    """One configuration: fresh components, sampling then training; returns a row of :data:`FIELDS`."""
    from diffusion_mdp.agents.base import add_lora
    from diffusion_mdp.ddim import DDIMSchedule, ddim_step_with_logprob
    from diffusion_mdp.mdp import decode_latents
    from diffusion_mdp.policy import DiffusionPolicy

    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    components = build_components(args.tiny, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    unet = components.unet
    low_precision_weights = device.type == "cuda"  # CPUs lack fast kernels for bf16/fp16 *weights*: autocast only
    if mode == "lora":
        if low_precision_weights:
            unet.to(dtype)  # frozen base weights in the low precision; the adapter stays float32 (add_lora)
        add_lora(unet, rank=4, alpha=4.0)
    else:
        unet.requires_grad_(True)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    if low_precision_weights:
        components.vae.to(dtype)
        components.text_encoder.to(dtype)
    schedule = DDIMSchedule.from_scheduler(components.scheduler, args.steps, eta=1.0)
    policy = DiffusionPolicy(components, schedule, guidance_scale=5.0)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=dtype)
    shape = components.latent_shape
    prompts = ["a cat riding a bike"] * args.sample_batch

    # SAMPLING: one warm-up batch, then --sample-batches timed ones; trajectories kept for training.
    def sample_batch(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        generator = torch.Generator(device).manual_seed(seed)
        latents = torch.randn((args.sample_batch, *shape), generator=generator, device=device)
        embeds = policy.encode_prompts(prompts).float()
        traj, log_probs = [latents], []
        with torch.no_grad():
            for t in schedule.timesteps:
                timesteps = t.repeat(len(latents)).to(device)
                with autocast:
                    eps = policy.predict(latents, timesteps, embeds.to(dtype))
                out = ddim_step_with_logprob(schedule, eps.float(), timesteps, latents, generator=generator)
                latents = out.prev_sample
                traj.append(latents)
                log_probs.append(out.log_prob)
            decode_latents(components.vae, latents.to(components.vae.dtype))
        return traj, log_probs, embeds

    sample_batch(0)
    synchronize(device)
    start = time.perf_counter()
    for b in range(args.sample_batches):
        traj, log_probs, embeds = sample_batch(b + 1)
    synchronize(device)
    images_per_s = args.sample_batches * args.sample_batch / (time.perf_counter() - start)

    # TRAINING: --train-steps (minibatch, timestep) forward+backward passes, an AdamW step after each minibatch.
    unet.train()
    n = min(args.train_batch, args.sample_batch)
    rows = torch.arange(n) % args.sample_batch
    advantages = torch.randn(n, device=device)

    def train_step(k: int) -> None:
        k = k % args.steps
        latents, next_latents = traj[k][rows], traj[k + 1][rows]
        timesteps = schedule.timesteps[k].repeat(n).to(device)
        with autocast:
            eps = policy.predict(latents, timesteps, embeds[rows].to(dtype))
        out = ddim_step_with_logprob(schedule, eps.float(), timesteps, latents, prev_sample=next_latents)
        ratio = torch.exp(out.log_prob - log_probs[k][rows])
        loss = -(advantages * ratio).mean()
        scaler.scale(loss).backward()

    train_step(0)
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    start = time.perf_counter()
    for k in range(args.train_steps):
        train_step(k)
        if (k + 1) % args.steps == 0 or k == args.train_steps - 1:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    step_s = (time.perf_counter() - start) / args.train_steps
    minibatches = args.samples_per_epoch / n
    epoch_s = minibatches * args.steps * step_s + args.samples_per_epoch / images_per_s
    return {
        "mode": mode,
        "precision": precision,
        "gradient_checkpointing": checkpointing,
        "sampling_images_per_s": images_per_s,
        "train_step_s": step_s,
        "training_s_per_epoch": epoch_s,
        "peak_memory_mib": peak_memory_mib(device),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="scaled-down configs that run on a CPU (tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; --tiny: 3)")
    parser.add_argument("--sample-batch", type=int, default=None, help="images per sampling batch (default 8)")
    parser.add_argument("--sample-batches", type=int, default=None, help="timed sampling batches (default 2)")
    parser.add_argument("--train-batch", type=int, default=None, help="trajectories per minibatch (default 4)")
    parser.add_argument("--train-steps", type=int, default=None, help="timed forward+backward passes (default 10)")
    parser.add_argument("--samples-per-epoch", type=int, default=256, help="the epoch extrapolated to (paper: 256)")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--precisions", default="fp16,bf16")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    small = {"steps": 3, "sample_batch": 2, "sample_batches": 1, "train_batch": 2, "train_steps": 2}
    large = {"steps": 50, "sample_batch": 8, "sample_batches": 2, "train_batch": 4, "train_steps": 10}
    for key, value in (small if args.tiny else large).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if torch.device(args.device).type != "cuda" and not args.tiny:
        print("no CUDA device: SD 1.5 at 512×512 on a CPU takes hours; use --tiny to check the script")
    rows = []
    print(
        f"SD 1.5 architecture{' (tiny)' if args.tiny else ''}, random weights, {args.device}, {args.steps} steps, "
        f"sample batch {args.sample_batch}, train batch {args.train_batch}, epoch = {args.samples_per_epoch} samples"
    )
    print(
        "| mode | precision | grad. checkpointing | sampling images/s | s per train step | "
        "training s/epoch (extrapolated) | peak memory MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        for precision in args.precisions.split(","):
            for checkpointing in (False, True):
                row = measure(args, mode, precision, checkpointing)
                rows.append(row)
                print(
                    f"| {mode} | {precision} | {'yes' if checkpointing else 'no'} | "
                    f"{row['sampling_images_per_s']:.3g} | {row['train_step_s']:.3g} | "
                    f"{row['training_s_per_epoch']:.4g} | {row['peak_memory_mib']:.0f} |",
                    flush=True,
                )
                if torch.device(args.device).type == "cuda":
                    torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
