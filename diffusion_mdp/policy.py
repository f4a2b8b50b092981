"""The diffusion model as a policy π_θ(x_{t-1} | x_t, c) for the denoising MDP.

:class:`DiffusionPolicy` wraps a diffusers ``UNet2DConditionModel`` (the trainable part) and a frozen CLIP
text encoder. Given observations s_t = (c, t, x_t) it computes the classifier-free-guided model output and
the Gaussian of a stochastic DDIM step (:func:`diffusion_mdp.ddim.ddim_step_with_logprob`), from which it
samples actions or scores given ones.

Observations are dicts as the environments return them, batched:

- ``latent``: ``(B, C, h, w)`` x_t (torch tensor or NumPy array),
- ``timestep``: ``(B,)`` t (may differ across the batch: training minibatches mix timesteps),
- ``prompt``: ``B`` strings c, or ``prompt_embeds``: ``(B, L, D)`` already encoded prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffusion_mdp.ddim import DDIMSchedule, DDIMStepOutput, LogProbReduction, ddim_step_with_logprob
from diffusion_mdp.models import DiffusionComponents


class DiffusionPolicy(nn.Module):
    """A text-conditioned diffusion model acting in the denoising MDP.

    Args:
        components: The loaded model (only ``unet``, ``text_encoder`` and ``tokenizer`` are used).
        schedule: The MDP's DDIM schedule (``env.unwrapped.schedule``); it fixes σ_t and the timesteps.
        guidance_scale: Classifier-free guidance weight w (1 disables guidance; the paper uses 5).
        log_prob_reduction: ``"mean"`` (DDPO's convention) or ``"sum"`` over latent dimensions.

    Example:
        >>> import gymnasium as gym, diffusion_mdp, torch
        >>> from diffusion_mdp.testing import build_reference_tiny_pipeline
        >>> import tempfile; folder = build_reference_tiny_pipeline(tempfile.mkdtemp())
        >>> env = gym.make_vec("DenoisingMDP-v0", num_envs=2, model=folder, prompts=["a red circle"], num_steps=3)
        >>> policy = DiffusionPolicy.from_env(env)
        >>> obs, _ = env.reset(seed=0)
        >>> actions, log_probs = policy.sample(obs, generator=torch.Generator().manual_seed(0))
        >>> actions.shape, log_probs.shape
        (torch.Size([2, 4, 32, 32]), torch.Size([2]))
        >>> torch.allclose(policy.log_prob(obs, actions), log_probs)
        True
    """

    def __init__(
        self,
        components: DiffusionComponents,
        schedule: DDIMSchedule,
        guidance_scale: float = 5.0,
        log_prob_reduction: LogProbReduction = "mean",
    ) -> None:
        super().__init__()
        if guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {guidance_scale}")
        self.unet = components.unet
        # The text encoder is frozen and not part of the policy's parameters (nor of its state_dict):
        # keeping it out of the module tree also keeps optimisers and checkpoints small.
        self._frozen = {"text_encoder": components.text_encoder}
        self.tokenizer = components.tokenizer
        self.components = components
        self.schedule = schedule
        self.guidance_scale = float(guidance_scale)
        self.log_prob_reduction: LogProbReduction = log_prob_reduction
        self._prompt_cache: dict[str, Tensor] = {}

    @classmethod
    def from_env(cls, env: Any, **kwargs: Any) -> DiffusionPolicy:
        """Build the policy of an environment's model and schedule (sharing its loaded modules)."""
        base = env.unwrapped if hasattr(env, "unwrapped") else env
        return cls(base.components, base.schedule, **kwargs)

    @property
    def text_encoder(self) -> nn.Module:
        return self._frozen["text_encoder"]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ----------------------------------------------------------------------------------------------
    # Prompts
    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """CLIP embeddings of prompts, ``(B, L, D)``, cached per prompt string (the encoder is frozen)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            tokens = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.text_encoder.device)
            embeds = self.text_encoder(tokens)[0]
            for prompt, embed in zip(missing, embeds, strict=True):
                self._prompt_cache[prompt] = embed
        return torch.stack([self._prompt_cache[p] for p in prompts]).to(self.device)

    def clear_prompt_cache(self) -> None:
        """Forget cached embeddings (after changing the text encoder)."""
        self._prompt_cache.clear()

    # ----------------------------------------------------------------------------------------------
    # The network
    # ----------------------------------------------------------------------------------------------
    def predict(self, latents: Tensor, timesteps: Tensor, prompt_embeds: Tensor) -> Tensor:
        """The guided model output ε̃ = ε_∅ + w (ε_c - ε_∅), or ε_c when w = 1.

        Both branches run in *one* UNet call on a batch of 2B (unconditional first, as diffusers does).

        Args:
            latents: ``(B, C, h, w)`` x_t.
            timesteps: ``(B,)`` t.
            prompt_embeds: ``(B, L, D)``.

        Returns:
            ``(B, C, h, w)``.
        """
        if self.guidance_scale == 1.0:
            return self.unet(latents, timesteps, encoder_hidden_states=prompt_embeds).sample
        uncond = self.encode_prompts([""]).expand_as(prompt_embeds)
        output = self.unet(
            torch.cat([latents, latents]),
            torch.cat([timesteps, timesteps]),
            encoder_hidden_states=torch.cat([uncond, prompt_embeds]),
        ).sample
        output_uncond, output_cond = output.chunk(2)
        return output_uncond + self.guidance_scale * (output_cond - output_uncond)

    def forward(
        self,
        obs: Mapping[str, Any],
        actions: Tensor | np.ndarray | None = None,
        generator: torch.Generator | None = None,
    ) -> DDIMStepOutput:
        """The DDIM step at ``obs``: samples an action (``actions=None``) or scores the given ones.

        Gradients flow to the UNet through the mean (use ``torch.no_grad()`` for rollouts).
        """
        latents, timesteps, embeds = self.unpack(obs)
        model_output = self.predict(latents, timesteps, embeds)
        if actions is not None:
            actions = torch.as_tensor(actions, device=latents.device, dtype=latents.dtype)
        return ddim_step_with_logprob(
            self.schedule,
            model_output.to(latents.dtype),
            timesteps,
            latents,
            prev_sample=actions,
            generator=generator,
            reduction=self.log_prob_reduction,
        )

    @torch.no_grad()
    def sample(self, obs: Mapping[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Sample actions x_{t-1} ~ π(· | s_t) without gradients.

        Returns:
            ``(actions (B, C, h, w), log_probs (B,))``.
        """
        out = self(obs, generator=generator)
        assert out.log_prob is not None  # η > 0 is enforced by the MDP
        return out.prev_sample, out.log_prob

    def log_prob(self, obs: Mapping[str, Any], actions: Tensor | np.ndarray) -> Tensor:
        """log π(actions | obs), ``(B,)``, differentiable with respect to the UNet's parameters."""
        out = self(obs, actions)
        assert out.log_prob is not None
        return out.log_prob

    def unpack(self, obs: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Observations (batched, or a single env's unbatched one) -> ``(latents, timesteps, prompt_embeds)``."""
        latents = torch.as_tensor(obs["latent"], device=self.device, dtype=torch.float32)
        timesteps = torch.as_tensor(obs["timestep"], device=self.device, dtype=torch.int64)
        if latents.ndim == 3:  # a single environment's observation
            latents, timesteps = latents[None], timesteps.reshape(1)
        if "prompt_embeds" in obs:
            embeds = torch.as_tensor(obs["prompt_embeds"], device=self.device)
        else:
            prompts = obs["prompt"]
            embeds = self.encode_prompts([prompts] if isinstance(prompts, str) else list(prompts))
        if not (latents.shape[0] == timesteps.shape[0] == embeds.shape[0]):
            raise ValueError(
                f"batch sizes differ: latent {latents.shape[0]}, timestep {timesteps.shape[0]}, "
                f"prompts {embeds.shape[0]}"
            )
        return latents, timesteps, embeds.to(latents.dtype)
