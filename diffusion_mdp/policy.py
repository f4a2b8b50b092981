"""The diffusion model as a policy π_θ(x_{t-1} | x_t, c) for the denoising MDP.

:class:`DiffusionPolicy` wraps a diffusers ``UNet2DConditionModel`` (the trainable part) and a frozen CLIP
text encoder. Given observations s_t = (c, t, x_t) it computes the classifier-free-guided model output and
the Gaussian of a stochastic DDIM step (:func:`diffusion_mdp.ddim.ddim_step_with_logprob`), from which it
samples actions or scores given ones.

Observations are dicts as the environments return them, batched:

- ``latent``: ``(B, C, h, w)`` x_t (torch tensor or NumPy array),
- ``timestep``: ``(B,)`` t (may differ across the batch: training minibatches mix timesteps),
- ``prompt``: ``B`` strings c, or ``prompt_embeds``: ``(B, L, D)`` already encoded prompts, or (what the
  environments return) ``prompt_id``: ``(B,)`` indices into ``prompts``, which :meth:`DiffusionPolicy.from_env`
  takes from the environment.

Stable Diffusion XL: the UNet also takes the second text encoder's pooled embedding (``text_embeds``) and
six "time ids" (original size, crop corner, target size) through ``added_cond_kwargs``. To keep one tensor
per prompt everywhere (observations, the rollout buffer, checkpoints), an SDXL prompt embedding is *packed*
as ``(B, L + 1, D)``: rows ``:L`` are the concatenated penultimate hidden states of both encoders (what
diffusers' ``encode_prompt`` returns), row ``L`` holds the pooled embedding zero-padded to width D.
:meth:`DiffusionPolicy.predict` unpacks it; the time ids are the image size with no crop, as the pipeline's
defaults. With ``force_zeros_for_empty_prompt`` (SDXL base), the unconditional branch of classifier-free
guidance uses all-zero embeddings, as diffusers does.

SD3 and FLUX (flow matching): the network is their transformer, the step is the flow SDE of
:mod:`diffusion_mdp.flow` (the schedule's kind decides), and prompts are encoded and fed as in their
diffusers pipelines by :mod:`diffusion_mdp.families.sd3` / :mod:`diffusion_mdp.families.flux`. FLUX is
guidance-distilled: ``guidance_scale`` is its embedded guidance input and there is no unconditional branch.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffusion_mdp.ddim import DDIMSchedule, DDIMStepOutput, LogProbReduction
from diffusion_mdp.families import family_module, is_flow, step_with_logprob
from diffusion_mdp.flow import FlowMatchSchedule, FlowStepOutput
from diffusion_mdp.models import DiffusionComponents


class DiffusionPolicy(nn.Module):
    """A text-conditioned diffusion model acting in the denoising MDP.

    Args:
        components: The loaded model (only ``unet``, ``text_encoder`` and ``tokenizer`` are used).
        schedule: The MDP's schedule (``env.unwrapped.schedule``): DDIM, or the flow SDE's for SD3 / FLUX.
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
        schedule: DDIMSchedule | FlowMatchSchedule,
        guidance_scale: float = 5.0,
        log_prob_reduction: LogProbReduction = "mean",
        unconditional_gradient: bool = True,
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
        # False: with gradients on, ε_∅ is computed without them (see predict).
        self.unconditional_gradient = bool(unconditional_gradient)
        self.log_prob_reduction: LogProbReduction = log_prob_reduction
        self._prompt_cache: dict[str, Tensor] = {}
        self.prompts: list[str] = []  # the texts of observations' prompt_id (set by from_env)
        self.is_sdxl = bool(getattr(components, "is_sdxl", False))
        self.family = str(getattr(components, "family", "sd"))
        # SD3 / FLUX: family-specific prompt encoding and network call (diffusion_mdp.families).
        self._family = family_module(self.family) if is_flow(self.family) else None
        if self._family is not None:
            for name in ("text_encoder_2", "text_encoder_3"):
                if getattr(components, name, None) is not None:
                    self._frozen[name] = getattr(components, name)
        if self.is_sdxl:
            self._frozen["text_encoder_2"] = components.text_encoder_2
            self.tokenizer_2 = components.tokenizer_2
            height, width = components.image_size
            # original_size + crops_coords_top_left + target_size, as StableDiffusionXLPipeline's defaults
            self.add_time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)

    @classmethod
    def from_env(cls, env: Any, **kwargs: Any) -> DiffusionPolicy:
        """Build the policy of an environment's model and schedule (sharing its loaded modules)."""
        base = env.unwrapped if hasattr(env, "unwrapped") else env
        policy = cls(base.components, base.schedule, **kwargs)
        policy.prompts = list(getattr(base, "prompts", []))
        return policy

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
        """Prompt embeddings, ``(B, L, D)`` (SDXL: packed ``(B, L + 1, D)``), cached per prompt (frozen encoders)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            self._warn_truncated(missing)
            if self._family is not None:
                embeds = self._family.encode(self, missing)
            else:
                embeds = self._encode_sdxl(missing) if self.is_sdxl else self._encode(missing)
            for prompt, embed in zip(missing, embeds, strict=True):
                self._prompt_cache[prompt] = embed
        return torch.stack([self._prompt_cache[p] for p in prompts]).to(self.device)

    def _warn_truncated(self, prompts: list[str]) -> None:
        """Warn (once per prompt: embeddings are cached) about prompts the tokenizer cuts to its length."""
        limit = int(self.tokenizer.model_max_length)
        lengths = self.tokenizer(list(prompts), truncation=False).input_ids
        cut = [p for p, ids in zip(prompts, lengths, strict=True) if len(ids) > limit]
        if cut:
            warnings.warn(
                f"{len(cut)} prompt(s) exceed the tokenizer's {limit} tokens (with start/end tokens) and are cut "
                f"to them, so the model never sees their end: {cut[:3]}. Shorten them to keep every word.",
                stacklevel=3,
            )

    def _encode(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(tokens)[0]

    def _encode_sdxl(self, prompts: list[str]) -> Tensor:
        """diffusers' SDXL ``encode_prompt`` (no clip skip), packed: ``(B, L + 1, D)``."""
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            tokens = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(encoder.device)
            out = encoder(tokens, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL reads the penultimate layer of both encoders
            pooled = out[0] if out[0].ndim == 2 else pooled  # the projected pooled output of the last encoder
        embeds = torch.cat(hidden, dim=-1)
        if pooled is None:
            raise ValueError("SDXL needs text_encoder_2 to be a CLIPTextModelWithProjection (pooled output)")
        if pooled.shape[-1] > embeds.shape[-1]:
            raise ValueError(f"pooled width {pooled.shape[-1]} exceeds the embedding width {embeds.shape[-1]}")
        pooled_row = embeds.new_zeros((len(prompts), 1, embeds.shape[-1]))
        pooled_row[:, 0, : pooled.shape[-1]] = pooled
        return torch.cat([embeds, pooled_row], dim=1)

    def unpack_sdxl(self, prompt_embeds: Tensor) -> tuple[Tensor, Tensor]:
        """Packed SDXL embeddings ``(B, L + 1, D)`` -> ``(encoder_hidden_states (B, L, D), pooled (B, P))``."""
        pooled_dim = int(self.text_encoder_2.config.projection_dim)
        return prompt_embeds[:, :-1], prompt_embeds[:, -1, :pooled_dim]

    def unconditional_embeds(self, like: Tensor) -> Tensor:
        """The unconditional branch's embeddings, shaped like ``like`` ``(B, L, D)``."""
        if self.is_sdxl and self.components.force_zeros_for_empty_prompt:
            return torch.zeros_like(like)
        return self.encode_prompts([""]).expand_as(like)

    @property
    def text_encoder_2(self) -> Any:
        """The second text encoder (SDXL / SD3: a ``CLIPTextModelWithProjection``, FLUX: T5), or None."""
        return self._frozen.get("text_encoder_2")

    def clear_prompt_cache(self) -> None:
        """Forget cached embeddings (after changing the text encoder)."""
        self._prompt_cache.clear()

    # ----------------------------------------------------------------------------------------------
    # The network
    # ----------------------------------------------------------------------------------------------
    def predict(
        self, latents: Tensor, timesteps: Tensor, prompt_embeds: Tensor, guidance_scale: float | None = None
    ) -> Tensor:
        """The guided model output ε̃ = ε_∅ + w (ε_c - ε_∅), or ε_c when w = 1.

        Both branches run in *one* UNet call on a batch of 2B (unconditional first, as diffusers does). With
        ``unconditional_gradient=False`` and gradients enabled, ε_∅ comes from a no-gradient call and only ε_c's
        from one with them: the same values, about 0.7× the cost of a forward + backward on CPU, but the
        gradient is w·∂ε_c/∂θ instead of the guided output's exact (1 − w)·∂ε_∅/∂θ + w·∂ε_c/∂θ.

        Args:
            latents: ``(B, C, h, w)`` x_t.
            timesteps: ``(B,)`` t.
            prompt_embeds: ``(B, L, D)``.
            guidance_scale: w for this call (default: the policy's); 1.0 gives the conditional branch ε_c.

        Returns:
            ``(B, C, h, w)``.
        """
        w = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        if self.family == "flux":  # guidance-distilled: w is the network's guidance input, no CFG
            assert self._family is not None  # set for every flow-matching family
            return self._family.forward(self, latents, timesteps, prompt_embeds, guidance_scale=w)
        if w == 1.0:
            return self._unet(latents, timesteps, prompt_embeds)
        uncond = self.unconditional_embeds(prompt_embeds)
        if not self.unconditional_gradient and torch.is_grad_enabled():
            with torch.no_grad():
                output_uncond = self._unet(latents, timesteps, uncond)
            output_cond = self._unet(latents, timesteps, prompt_embeds)
        else:
            output = self._unet(
                torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), torch.cat([uncond, prompt_embeds])
            )
            output_uncond, output_cond = output.chunk(2)
        return output_uncond + w * (output_cond - output_uncond)

    def _unet(self, latents: Tensor, timesteps: Tensor, prompt_embeds: Tensor) -> Tensor:
        """One UNet call; for SDXL, with the pooled embeddings and time ids as ``added_cond_kwargs``."""
        if self._family is not None:
            return self._family.forward(self, latents, timesteps, prompt_embeds)
        if not self.is_sdxl:
            return self.unet(latents, timesteps, encoder_hidden_states=prompt_embeds).sample
        hidden, pooled = self.unpack_sdxl(prompt_embeds)
        time_ids = self.add_time_ids.to(device=latents.device, dtype=hidden.dtype).expand(len(latents), -1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return self.unet(latents, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample

    def forward(
        self,
        obs: Mapping[str, Any],
        actions: Tensor | np.ndarray | None = None,
        generator: torch.Generator | None = None,
    ) -> DDIMStepOutput | FlowStepOutput:
        """The policy's step at ``obs``: samples an action (``actions=None``) or scores the given ones.

        Gradients flow to the UNet through the mean (use ``torch.no_grad()`` for rollouts).
        """
        latents, timesteps, embeds = self.unpack(obs)
        model_output = self.predict(latents, timesteps, embeds)
        if actions is not None:
            actions = torch.as_tensor(actions, device=latents.device, dtype=latents.dtype)
        return step_with_logprob(
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
        if self.schedule.eta == 0:  # refuse before running the UNet: η = 0 actions have no density
            raise ValueError(self._deterministic_message("sample"))
        out = self(obs, generator=generator)
        if out.log_prob is None:
            raise ValueError(self._deterministic_message("sample"))
        return out.prev_sample, out.log_prob

    def log_prob(self, obs: Mapping[str, Any], actions: Tensor | np.ndarray) -> Tensor:
        """log π(actions | obs), ``(B,)``, differentiable with respect to the UNet's parameters."""
        out = self(obs, actions)
        if out.log_prob is None:
            raise ValueError(self._deterministic_message("log_prob"))
        return out.log_prob

    def _deterministic_message(self, method: str) -> str:
        return (
            f"policy.{method} needs a stochastic schedule, but this policy's has eta={self.schedule.eta}: an η = 0 "
            "step is deterministic and has no log-probability. Build the schedule with eta > 0 (the MDP's), or "
            "sample η = 0 images with diffusion_mdp.agents.base.sample_deterministic"
        )

    def unpack(self, obs: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Observations (batched, or a single env's unbatched one) -> ``(latents, timesteps, prompt_embeds)``."""
        latents = torch.as_tensor(obs["latent"], device=self.device, dtype=torch.float32)
        timesteps = torch.as_tensor(obs["timestep"], device=self.device, dtype=torch.int64)
        if latents.ndim == 3:  # a single environment's observation
            latents, timesteps = latents[None], timesteps.reshape(1)
        if "prompt_embeds" in obs:
            embeds = torch.as_tensor(obs["prompt_embeds"], device=self.device)
        elif "prompt" in obs:
            prompts = obs["prompt"]
            embeds = self.encode_prompts([prompts] if isinstance(prompts, str) else list(prompts))
        else:
            if not self.prompts:
                raise ValueError(
                    "the observation has prompt_id but no prompt text: build the policy with "
                    "DiffusionPolicy.from_env(env) (it reads env.prompts), or add obs['prompt']"
                )
            ids = torch.as_tensor(obs["prompt_id"]).reshape(-1).tolist()
            embeds = self.encode_prompts([self.prompts[int(i)] for i in ids])
        if not (latents.shape[0] == timesteps.shape[0] == embeds.shape[0]):
            raise ValueError(
                f"batch sizes differ: latent {latents.shape[0]}, timestep {timesteps.shape[0]}, "
                f"prompts {embeds.shape[0]}"
            )
        return latents, timesteps, embeds.to(latents.dtype)
