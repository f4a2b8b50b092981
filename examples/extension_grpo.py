"""An algorithm added from outside the library: GRPO-style group baselines + PPO-clip + a KL leash.

This file is the worked example of the extension point (docs/plug_in.md): subclass ``DiffusionAgent``,
implement its loss on one step batch (``step_loss``) and, here, the advantages (``prepare_update``),
``register_algorithm``. The base class does everything else — rollouts into the buffer, the update loop
(shuffling, gradient accumulation, clipping, AdamW), LoRA, evaluation, checkpoints, logging, resume.

What this variant changes, compared with the built-in ``ddpo_is`` + ``advantage_mode="group"``:

- **Advantage.** The rollouts draw k samples per prompt (``advantage_mode="group"`` tells the base class
  to); the advantage is computed here, through the buffer's ``advantage_fn`` hook, as
  A = (r - mean of the prompt's group) / std of the *whole batch*. The group mean is GRPO's baseline; the
  shared scale (as Dr. GRPO argues) does not blow up the noise of groups whose k rewards are almost equal,
  which per-group std normalisation does.
- **KL regularisation always on.** loss = L^CLIP + β KL(π_θ ‖ π_ref), π_ref = the UNet without its LoRA
  (closed form for the two Gaussians of a DDIM step, ``DiffusionAgent.kl_to_reference``), β = ``kl_coef``.

    python examples/extension_grpo.py                   # tiny-shapes preset with algorithm=grpo
    python examples/extension_grpo.py --smoke --model <pipeline folder> --reward jpeg_compressibility
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
from torch import Tensor

from diffusion_mdp.agents import DiffusionAgent, StepBatch, build_config, ppo_clip_loss, register_algorithm, train
from diffusion_mdp.agents.config import ConfigError
from diffusion_mdp.agents.presets import TINY_SHAPES_LORA_RECIPE


def group_mean_batch_std(
    returns: np.ndarray, prompts: Sequence[str], group_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The buffer's ``advantage_fn``: each trajectory's (μ, σ) = (its group's mean return, the batch's std).

    Args:
        returns: ``(n,)`` terminal rewards. prompts: n strings (unused). group_ids: ``(n,)`` group of each.

    >>> mu, sigma = group_mean_batch_std(np.array([1.0, 3.0, 10.0, 10.0]), [], np.array([0, 0, 1, 1]))
    >>> mu.tolist(), sigma.round(3).tolist()
    ([2.0, 2.0, 10.0, 10.0], [3.897, 3.897, 3.897, 3.897])
    """
    mean = np.empty_like(returns, dtype=np.float64)
    for gid in np.unique(group_ids):
        mean[group_ids == gid] = returns[group_ids == gid].mean()
    return mean, np.full_like(mean, returns.std() + 1e-6)


class GRPO(DiffusionAgent):
    """Group-baseline PPO-clip with a KL penalty to the pre-trained model (needs ``advantage_mode="group"``)."""

    algorithm: ClassVar[str] = "grpo"

    def __init__(self, config, components=None) -> None:  # type: ignore[no-untyped-def]
        if config.advantage_mode != "group" or not config.use_lora:
            raise ConfigError(
                "grpo samples k images per prompt and regularises towards the LoRA-free model: "
                "set advantage_mode='group' (and group_size) and use_lora=true"
            )
        super().__init__(config, components)

    def prepare_update(self, epoch: int) -> dict[str, float]:
        # 1. Advantages: the buffer calls our (μ, σ) function on the terminal rewards, fills A for every step.
        self.buffer.compute_returns_and_advantage(group_mean_batch_std, self.config.adv_clip_max)
        return {"clip_range": self.current_clip_range(epoch)}

    def step_loss(self, step: StepBatch, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        # 2. The loss on one step batch (b trajectories, each at its own timestep): the base class's update
        #    loop shuffles, scales by 1/(K·G), accumulates, clips and steps AdamW around it.
        log_prob, out = self.step_log_prob(step)  # log π_θ(x_{t-1} | x_t, c) with gradients
        loss, stats = ppo_clip_loss(log_prob, step.old_log_probs, step.advantages, self.current_clip_range(epoch))
        kl = self.kl_to_reference(step, out).mean()
        return loss + self.config.kl_coef * kl, {"kl_ref": kl, "clipfrac": stats["clipfrac"]}


register_algorithm("grpo", GRPO)  # now build_config(algorithm="grpo") and train(...) know it


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder (default: bundled tiny-shapes)")
    parser.add_argument("--reward", default=None, help="default: the preset's (prompt_alignment)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--kl-coef", type=float, default=0.01)
    parser.add_argument("--out", default="runs/extension_grpo")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: 1 epoch of 4 samples, 2 steps")
    args = parser.parse_args(argv)

    overrides: dict = dict(
        **TINY_SHAPES_LORA_RECIPE,  # the KL's reference is the UNet with its LoRA adapter disabled
        algorithm="grpo",
        advantage_mode="group",
        group_size=4,
        kl_coef=args.kl_coef,
        num_epochs=args.epochs,
    )
    overrides.update(name="grpo", output_dir=args.out, progress_bar=False, log_formats="csv")
    if args.model:
        overrides["model"] = args.model
    if args.reward:
        overrides["reward"] = args.reward
    if args.smoke:
        overrides.update(
            num_epochs=1,
            num_steps=2,
            samples_per_epoch=4,
            sample_batch_size=4,
            train_batch_size=4,
            group_size=2,
            eval_num_samples=2,
            eval_every=1,
            save_every=1,
            image_every=1,
            num_threads=1,
        )
    config = build_config(preset="tiny-shapes", **overrides)
    if (config.run_dir / "checkpoints" / "last.pt").exists():
        raise SystemExit(f"{config.run_dir} already holds a run; choose another --out")
    _, summary = train(config)
    print(f"held-out reward (η=0): before {summary['eval_before']:.4f}  after {summary['eval_after']:.4f}")
    (Path(args.out) / "result.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
