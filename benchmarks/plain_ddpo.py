"""A DDPO-IS epoch written the plain way, as the authors' code does it: the baseline of the agent benchmark.

Written from the paper's algorithm (Black et al. 2023, section 4 and algorithm 1 of the appendix) with nothing
of this project's machinery: no environment, no rollout buffer, no policy class, no prompt-embedding cache.
What it does per epoch, in the order of the authors' ``scripts/train.py``:

SAMPLING: for each sample batch, encode its prompts with the text encoder (the unconditional ``""`` embedding
once per run), start from x_T ~ N(0, I), and for t = t_T … t_1 call the UNet on the classifier-free-guidance
batch ``cat([x_t, x_t])`` (unconditional first), guide ε̃ = ε_∅ + w (ε_c - ε_∅), and take one stochastic DDIM
step with its log-probability (:func:`ddim_step_with_logprob` below). Then decode x_0 with the VAE and score it.

TRAINING: advantages A = (r - mean r) / std r over the epoch, clipped; shuffle the samples and, independently
per sample, their timesteps; for each minibatch and each of its T timesteps one forward (the same CFG batch)
and one backward of the PPO-clip loss at float32 through a peft LoRA on the attention projections,
accumulating the gradient over the T timesteps; then clip the gradient norm and step AdamW.

Notation (code -> paper): ``alpha_prod_t`` -> ᾱ_t, ``alpha_prod_t_prev`` -> ᾱ_{t-1}, ``std_dev_t`` -> σ_t,
``pred_original_sample`` -> x̂_0, ``prev_sample_mean`` -> μ_θ(x_t, t, c), ``log_prob`` -> log π_θ(x_{t-1} | x_t, c)
averaged over latent dimensions (the authors' convention, which makes the clip range 1e-4 meaningful).

    >>> import tempfile
    >>> from diffusion_mdp.testing import build_reference_tiny_pipeline
    >>> folder = build_reference_tiny_pipeline(tempfile.mkdtemp(), size="micro")
    >>> plain = PlainDDPO(folder, ["a red circle"], PlainConfig(num_steps=2, samples_per_epoch=2, sample_batch_size=2,
    ...                                                           train_batch_size=2))
    >>> result = plain.run_epoch(0)
    >>> abs(result["first_ratio"] - 1.0) < 1e-5  # the first minibatch is scored by the policy that sampled it
    True
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


@dataclass
class PlainConfig:
    """The workload of one plain epoch (the defaults are the agent benchmark's reference workload)."""

    num_steps: int = 20
    """Denoising steps T."""
    eta: float = 1.0
    """DDIM η."""
    guidance_scale: float = 5.0
    """Classifier-free guidance weight w."""
    samples_per_epoch: int = 16
    """Trajectories per epoch."""
    sample_batch_size: int = 8
    """Trajectories denoised together."""
    train_batch_size: int = 8
    """Trajectories per minibatch (one AdamW step per minibatch, the gradient accumulated over its T steps)."""
    lora_rank: int = 4
    """LoRA rank r."""
    lora_alpha: float = 4.0
    """LoRA α."""
    learning_rate: float = 3e-4
    """AdamW learning rate."""
    clip_range: float = 1e-4
    """PPO clip range ε."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to ± this."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping."""
    seed: int = 0
    """Seed of prompts, noise and shuffling."""


def ddim_step_with_logprob(
    scheduler: Any,
    model_output: Tensor,
    timestep: Tensor,
    sample: Tensor,
    eta: float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One stochastic DDIM step (DDIM eq. 12 and 16) and the mean log-density of its result.

    Args:
        scheduler: A diffusers ``DDIMScheduler`` after ``set_timesteps`` (ε-prediction).
        model_output: ``(B, C, h, w)`` the guided ε̃.
        timestep: ``(B,)`` int64 t of each sample.
        sample: ``(B, C, h, w)`` x_t.
        eta: η.
        prev_sample: ``(B, C, h, w)`` the x_{t-1} to score; None samples one.
        generator: RNG for sampling.

    Returns:
        ``(prev_sample (B, C, h, w), log_prob (B,))``.
    """
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_timestep = timestep - step
    alphas = scheduler.alphas_cumprod.to(sample.device)
    alpha_prod_t = alphas.gather(0, timestep.cpu()).to(sample.device)
    alpha_prod_t_prev = torch.where(
        prev_timestep.cpu() >= 0,
        alphas.gather(0, prev_timestep.clamp(min=0).cpu()),
        torch.as_tensor(float(scheduler.final_alpha_cumprod)),
    ).to(sample.device)
    shape = (-1,) + (1,) * (sample.ndim - 1)
    alpha_prod_t, alpha_prod_t_prev = alpha_prod_t.view(shape), alpha_prod_t_prev.view(shape)
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()
    variance = (1 - alpha_prod_t_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance.sqrt()
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2).sqrt() * model_output
    prev_sample_mean = alpha_prod_t_prev.sqrt() * pred_original_sample + pred_sample_direction
    if prev_sample is None:
        noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype, device=sample.device)
        prev_sample = prev_sample_mean + std_dev_t * noise
    log_prob = (
        -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * std_dev_t**2)
        - torch.log(std_dev_t)
        - math.log(math.sqrt(2 * math.pi))
    )
    return prev_sample.to(sample.dtype), log_prob.mean(dim=tuple(range(1, sample.ndim)))


def jpeg_compressibility(images: np.ndarray) -> np.ndarray:
    """−(JPEG size in kB at quality 95) of ``(B, H, W, 3)`` uint8 images, the paper's first reward."""
    import io

    from PIL import Image

    sizes = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return -np.asarray(sizes)


class PlainDDPO:
    """The plain DDPO-IS loop on a diffusers pipeline folder (see the module docstring).

    Args:
        model: A Stable Diffusion pipeline folder (``save_pretrained`` layout), or ``"tiny-shapes"``.
        prompts: The training prompts (drawn uniformly).
        config: The workload.
        reward_fn: ``images uint8 (B, H, W, 3) -> rewards (B,)``; JPEG compressibility by default.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        prompts: Sequence[str],
        config: PlainConfig | None = None,
        reward_fn: Callable[[np.ndarray], np.ndarray] = jpeg_compressibility,
    ) -> None:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from peft import LoraConfig
        from transformers import CLIPTextModel, CLIPTokenizer

        from diffusion_mdp.models import resolve_model

        self.config = cfg = config or PlainConfig()
        self.prompts = list(prompts)
        self.reward_fn = reward_fn
        folder = os.fspath(resolve_model(model)[0])
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
        if self.scheduler.config.prediction_type != "epsilon":
            raise ValueError("the plain baseline implements ε-prediction only; use an epsilon pipeline")
        self.scheduler.set_timesteps(cfg.num_steps)
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
        torch.manual_seed(cfg.seed)
        self.unet.add_adapter(
            LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha,
                init_lora_weights="gaussian",
                target_modules=LORA_TARGET_MODULES,
            )
        )
        self.trainable = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.learning_rate, betas=(0.9, 0.999), weight_decay=1e-4)
        self.neg_prompt_embed = self.encode([""])  # (1, L, D)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        """Prompt embeddings ``(B, L, D)``."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids)[0]

    def guided_noise_pred(self, latents: Tensor, timesteps: Tensor, embeds: Tensor) -> Tensor:
        """ε̃ from one UNet call on the CFG batch ``(2B, C, h, w)``; returns ``(B, C, h, w)``."""
        neg = self.neg_prompt_embed.expand(len(latents), -1, -1)
        noise_pred = self.unet(
            torch.cat([latents, latents]),
            torch.cat([timesteps, timesteps]),
            encoder_hidden_states=torch.cat([neg, embeds]),
        ).sample
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        return noise_pred_uncond + self.config.guidance_scale * (noise_pred_text - noise_pred_uncond)

    # ################### SAMPLING ###################
    @torch.no_grad()
    def sample(self, epoch: int) -> dict[str, Any]:
        """Sample the epoch's trajectories; returns latents ``(n, T + 1, C, h, w)``, log_probs ``(n, T)``, ..."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, epoch])
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        self.unet.eval()
        batches = []
        reward_s = 0.0
        for _ in range(cfg.samples_per_epoch // cfg.sample_batch_size):
            prompts = [self.prompts[i] for i in rng.integers(len(self.prompts), size=cfg.sample_batch_size)]
            embeds = self.encode(prompts)
            shape = (
                cfg.sample_batch_size,
                self.unet.config.in_channels,
                self.unet.config.sample_size,
                self.unet.config.sample_size,
            )
            latents = torch.randn(shape, generator=generator)
            all_latents, all_log_probs = [latents], []
            for t in self.scheduler.timesteps:
                timesteps = t.repeat(len(latents))
                noise_pred = self.guided_noise_pred(latents, timesteps, embeds)
                latents, log_prob = ddim_step_with_logprob(
                    self.scheduler, noise_pred, timesteps, latents, cfg.eta, generator=generator
                )
                all_latents.append(latents)
                all_log_probs.append(log_prob)
            images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            images = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            start = time.perf_counter()
            rewards = torch.as_tensor(self.reward_fn(images), dtype=torch.float32)
            reward_s += time.perf_counter() - start
            batches.append(
                {
                    "latents": torch.stack(all_latents, dim=1),
                    "log_probs": torch.stack(all_log_probs, dim=1),
                    "timesteps": self.scheduler.timesteps.repeat(cfg.sample_batch_size, 1),
                    "prompt_embeds": embeds,
                    "rewards": rewards,
                }
            )
        samples = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
        samples["reward_s"] = reward_s
        return samples

    # ################### TRAINING ###################
    def train(self, samples: dict[str, Any], epoch: int) -> float:
        """One pass over the samples; returns the mean importance ratio at the first minibatch's first step."""
        cfg = self.config
        rewards = samples["rewards"]
        advantages = ((rewards - rewards.mean()) / (rewards.std() + 1e-8)).clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
        n, steps = samples["log_probs"].shape
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        perm = torch.randperm(n, generator=generator)
        time_perm = torch.stack([torch.randperm(steps, generator=generator) for _ in range(n)])
        self.unet.train()
        first_ratio = float("nan")
        for start in range(0, n, cfg.train_batch_size):
            idx = perm[start : start + cfg.train_batch_size]
            for j in range(steps):
                k = time_perm[idx, j]
                latents = samples["latents"][idx, k]
                next_latents = samples["latents"][idx, k + 1]
                timesteps = samples["timesteps"][idx, k]
                noise_pred = self.guided_noise_pred(latents, timesteps, samples["prompt_embeds"][idx])
                _, log_prob = ddim_step_with_logprob(
                    self.scheduler, noise_pred, timesteps, latents, cfg.eta, prev_sample=next_latents
                )
                ratio = torch.exp(log_prob - samples["log_probs"][idx, k])
                adv = advantages[idx]
                unclipped = -adv * ratio
                clipped = -adv * torch.clamp(ratio, 1.0 - cfg.clip_range, 1.0 + cfg.clip_range)
                loss = torch.maximum(unclipped, clipped).mean()
                (loss / steps).backward()
                if start == 0 and j == 0:
                    first_ratio = float(ratio.mean().detach())
            torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad()
        return first_ratio

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """Sample then train; returns seconds of sampling (without the reward), reward and training."""
        t0 = time.perf_counter()
        samples = self.sample(epoch)
        t1 = time.perf_counter()
        first_ratio = self.train(samples, epoch)
        t2 = time.perf_counter()
        return {
            "sampling_s": t1 - t0 - samples["reward_s"],
            "reward_s": samples["reward_s"],
            "training_s": t2 - t1,
            "first_ratio": first_ratio,
        }
