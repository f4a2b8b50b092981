# %% [markdown]
# # Lesson 3 — PPO-clip, DDPO-IS, and why the clip range is 1e-4
#
# REINFORCE (lesson 2) uses each batch of samples for one gradient step. DDPO-IS reuses it for several,
# correcting with the importance ratio ρ = π_θ(a|s) / π_old(a|s) and keeping θ near θ_old with PPO's clip:
#
#     L^CLIP = E[ max(-A ρ, -A clip(ρ, 1 - ε, 1 + ε)) ]
#
# An action here is a whole latent of D = C·h·w numbers. log π is a sum of D per-dimension terms; DDPO
# uses their **mean** instead (the library's default). Then log ρ_sum = D · log ρ_mean: a change that moves
# the mean-log-ratio by 1e-4 moves the true (sum) log-ratio by D·1e-4 — already 0.1 for the tiny-shapes
# latent (D = 1024) and 1.6 for Stable Diffusion's (D = 16384). ε = 1e-4 on mean log-probs is PPO's usual
# trust region of ~0.1–0.2 on the true ratio, in disguise.

# %%
import copy

import gymnasium as gym
import matplotlib.pyplot as plt
import numpy as np
import torch
from lesson_utils import MODEL, REWARD, pick, save_figure, save_results

import diffusion_mdp  # noqa: F401
from diffusion_mdp.agents import ppo_clip_loss
from diffusion_mdp.agents.base import add_lora
from diffusion_mdp.policy import DiffusionPolicy

torch.manual_seed(0)
N, T, K, LR = pick(16, 2), pick(10, 2), pick(8, 2), 1e-3

env = gym.make_vec(
    "DenoisingMDP-v0",
    num_envs=N,
    model=MODEL,
    reward=REWARD,
    prompts="shapes_counting",
    num_steps=T,
    autoreset_mode="Disabled",
)
policy = DiffusionPolicy.from_env(env, guidance_scale=5.0)
add_lora(policy.unet, rank=4, alpha=4.0)
params = [p for p in policy.unet.parameters() if p.requires_grad]
D = int(np.prod(env.unwrapped.mdp.latent_shape))
print(f"latent dimensions D = {D}")

# %% [markdown]
# ## One batch of experience, with π_old's log-probabilities

# %%
obs, _ = env.reset(seed=0)
batch, terminated = [], np.zeros(N, dtype=bool)
with torch.no_grad():
    while not terminated.all():
        actions, old_log_probs = policy.sample(obs)  # mean over dimensions (DDPO's convention)
        batch.append((obs, actions, old_log_probs))
        obs, rewards, terminated, _, _ = env.step(actions)
advantages = torch.as_tensor((rewards - rewards.mean()) / (rewards.std() + 1e-6), dtype=torch.float32)
initial_lora = copy.deepcopy({n: p.detach().clone() for n, p in policy.unet.named_parameters() if p.requires_grad})


def restore() -> None:
    """Back to θ_old (the LoRA weights at sampling time)."""
    with torch.no_grad():
        for name, param in policy.unet.named_parameters():
            if name in initial_lora:
                param.copy_(initial_lora[name])


def log_ratios() -> torch.Tensor:
    """log ρ_mean for every (step, episode) of the batch, ``(T, N)``, without gradients."""
    with torch.no_grad():
        return torch.stack([policy.log_prob(o, a) - old for o, a, old in batch])


# %% [markdown]
# ## Experiment 1 — how big is one gradient step, in ratio terms?
#
# One AdamW step (lr 1e-3) on the REINFORCE loss, then the ratios of every stored action, both ways.

# %%
optimizer = torch.optim.AdamW(params, lr=LR)
for o, a, _ in batch:
    (-(advantages * policy.log_prob(o, a)).mean() / T).backward()
optimizer.step()
optimizer.zero_grad()
log_rho_mean = log_ratios().flatten()
log_rho_sum = D * log_rho_mean  # the per-dimension terms are the same; the sum is D times their mean
print(f"|log ρ| with mean log-probs: median {log_rho_mean.abs().median():.2e}")
print(f"|log ρ| with sum log-probs:  median {log_rho_sum.abs().median():.2e}", end="  ")
print(f"(ratios up to {log_rho_sum.exp().max():.3g})")
print(f"fraction clipped at ε = 1e-4 (mean): {(log_rho_mean.exp() - 1).abs().gt(1e-4).float().mean():.2f}")
print(f"fraction clipped at ε = 0.2  (sum):  {(log_rho_sum.exp() - 1).abs().gt(0.2).float().mean():.2f}")

# %% [markdown]
# ## Experiment 2 — the clip at work
#
# K updates on the *same* batch, from θ_old each time: PPO-clip with ε = 1e-4 against the unclipped
# importance-sampled objective (ε = ∞). After each update we log how far the policy has moved from θ_old
# (the median over (step, sample) pairs: the last steps, where σ_t is tiny, have much larger ratios).

# %%
curves = {}
for name, clip_range in (("clipped, ε = 1e-4", 1e-4), ("unclipped", float("inf"))):
    restore()
    optimizer = torch.optim.AdamW(params, lr=LR)
    moved, clipfrac = [], []
    for _ in range(K):
        fractions = []
        for o, a, old in batch:
            loss, stats = ppo_clip_loss(policy.log_prob(o, a), old, advantages, clip_range)
            (loss / T).backward()
            fractions.append(float(stats["clipfrac"]))
        optimizer.step()
        optimizer.zero_grad()
        moved.append(float(log_ratios().abs().median()))
        clipfrac.append(float(np.mean(fractions)))
    curves[name] = {"median_abs_log_ratio": moved, "clipfrac": clipfrac}
    print(f"{name:18s}: median |log ρ| after each update {np.round(moved, 6).tolist()}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
bins = np.linspace(-9, 3, 49)
axes[0].hist(np.log10(log_rho_mean.abs().numpy() + 1e-12), bins=bins, alpha=0.7, label="mean over dims (DDPO)")
axes[0].hist(np.log10(log_rho_sum.abs().numpy() + 1e-12), bins=bins, alpha=0.7, label=f"sum over dims (D={D})")
axes[0].axvline(-4, color="k", ls=":", label="ε = 1e-4")
axes[0].axvline(np.log10(0.2), color="gray", ls="--", label="ε = 0.2")
axes[0].set(title="after one AdamW step: log10 |log ρ|", xlabel="log10 |log ρ|", ylabel="(step, sample) pairs")
axes[0].legend(fontsize=7)
for name, curve in curves.items():
    axes[1].plot(np.arange(1, K + 1), curve["median_abs_log_ratio"], "o-", label=f"{name}: median |log ρ|")
axes[1].axhline(1e-4, color="k", ls=":")
axes[1].set_yscale("log")
axes[1].set(title="K updates on one batch", xlabel="update", ylabel="median |log ρ| (mean log-probs)")
ax2 = axes[1].twinx()
ax2.plot(np.arange(1, K + 1), curves["clipped, ε = 1e-4"]["clipfrac"], "s--", color="tab:gray", label="clip fraction")
ax2.set_ylim(0, 1.05)
axes[1].legend(fontsize=7, loc="upper left")
ax2.legend(fontsize=7, loc="lower right")
fig.suptitle("Lesson 3: importance ratios and PPO's clip on mean log-probabilities")
save_figure(fig, "lesson3_ppo_clip.png")
save_results(
    "lesson3.json",
    {
        "D": D,
        "median_abs_log_ratio_mean": float(log_rho_mean.abs().median()),
        "median_abs_log_ratio_sum": float(log_rho_sum.abs().median()),
        "curves": curves,
    },
)

# %% [markdown]
# ## Exercises
#
# 1. Compute the clip range ε_sum you would need with sum log-probs to clip the same fraction as ε = 1e-4
#    does with mean log-probs. How does it scale with D? (`DiffusionPolicy(log_prob_reduction="sum")`.)
# 2. Why does the clipped run keep moving a little after every ratio is outside [1 - ε, 1 + ε], where the
#    clipped loss has zero gradient? (Hint: what does AdamW keep between steps?)
# 3. Run the library's DDPO-IS with 4 inner epochs (`diffusion-mdp train --preset tiny-shapes
#    --num-inner-epochs 4`) and with `--clip-range 1e-2`: compare `approx_kl` and `clipfrac` in the logs.
