# %% [markdown]
# # Lesson 1 — The denoising MDP
#
# DDPO (Black et al., 2023, §4.1) turns sampling from a diffusion model into a T-step MDP:
#
# | | |
# |---|---|
# | state s_t | (c, t, x_t): the prompt, the timestep, the current latent |
# | action a_t | x_{t-1}: the next, less noisy latent |
# | transition | deterministic: the action *is* the next state's latent |
# | policy π_θ(a_t \| s_t) | the stochastic DDIM step N(μ_θ(x_t, t, c), σ_t² I) |
# | reward | r(x_0, c) after the last step, 0 before |
#
# In this lesson we step one episode **by hand**, look at the states x_t and at the model's guess of the
# final image x̂_0 along the way, and ask the reward what it thinks of x̂_0 before the episode is over.
#
# Run: `python examples/lessons/lesson1_denoising_mdp.py` (add `--smoke` for a 3-step version).

# %%
import gymnasium as gym
import matplotlib.pyplot as plt
import numpy as np
import torch
from lesson_utils import MODEL, REWARD, pick, save_figure, save_results, show_images

import diffusion_mdp  # noqa: F401  (registers DenoisingMDP-v0)
from diffusion_mdp.mdp import decode_latents
from diffusion_mdp.policy import DiffusionPolicy

T = pick(20, 3)
PROMPT = "three red circles"

# %% [markdown]
# ## The environment
#
# One episode, one prompt. Observations hold the latent, the timestep, the prompt text and its index.

# %%
env = gym.make("DenoisingMDP-v0", model=MODEL, reward=REWARD, prompts=[PROMPT], num_steps=T, render_mode="rgb_array")
print("observation space:", env.observation_space)
print("action space:     ", env.action_space)
mdp = env.unwrapped.mdp
print("timesteps t of the episode:", mdp.schedule.timesteps.tolist())

# %% [markdown]
# ## The policy
#
# `DiffusionPolicy` is the diffusion model seen as a policy. `policy(obs)` runs the UNet (with
# classifier-free guidance) and returns the DDIM step: its mean μ_θ, its standard deviation σ_t (fixed by
# the schedule and η), a sampled action, its log-probability, and the predicted clean latent x̂_0.

# %%
policy = DiffusionPolicy.from_env(env, guidance_scale=5.0)
generator = torch.Generator().manual_seed(0)
obs, _ = env.reset(seed=0)

states, guesses, titles = [], [], []
sigmas, log_probs, guess_rewards = [], [], []
terminated = False
while not terminated:
    with torch.no_grad():
        step = policy(obs, generator=generator)  # a DDIMStepOutput for a batch of one
    x0_hat = decode_latents(mdp.components.vae, step.pred_original_sample)  # (1, H, W, 3) uint8
    # What would the reward say if the episode stopped here and x̂_0 were the image?
    r_hat, _ = mdp.reward_fn(x0_hat, [PROMPT], [mdp.prompts.metadata[0]])
    states.append(env.render())
    guesses.append(x0_hat[0])
    titles.append(f"t={int(obs['timestep'])}")
    sigmas.append(float(step.std.flatten()[0]))
    log_probs.append(float(step.log_prob[0]))
    guess_rewards.append(float(r_hat[0]))

    action = step.prev_sample[0].numpy()
    obs, reward, terminated, _, info = env.step(action)
    # The transition is deterministic: the next state's latent is exactly the action we chose.
    assert np.array_equal(obs["latent"], action)

print(f"prompt {PROMPT!r}: reward r(x_0, c) = {reward:.4f} ({REWARD})")
print("σ_t per step:       ", np.round(sigmas, 3).tolist())
print("log π(a_t|s_t) mean:", np.round(log_probs, 3).tolist())
print("r(x̂_0) per step:    ", np.round(guess_rewards, 3).tolist())

# %% [markdown]
# ## A picture of the episode
#
# Top: the states x_t (decoded). Middle: the model's guess x̂_0 at each state. Bottom: σ_t, the mean
# log-probability of the chosen action, and the reward of x̂_0 — how early is the outcome decided?

# %%
show = np.unique(np.linspace(0, T - 1, min(T, 8)).round().astype(int))
fig = plt.figure(figsize=(1.4 * (len(show) + 1), 5.2))
grid = fig.add_gridspec(3, len(show) + 1, height_ratios=[1, 1, 1.4])
show_images(
    [fig.add_subplot(grid[0, i]) for i in range(len(show))], [states[k] for k in show], [titles[k] for k in show]
)
show_images([fig.add_subplot(grid[1, i]) for i in range(len(show))], [guesses[k] for k in show], ["x̂_0"] * len(show))
show_images([fig.add_subplot(grid[0, len(show)])], [info["image"]], [f"x_0, r={reward:.2f}"])
ax = fig.add_subplot(grid[2, :])
steps = np.arange(1, T + 1)
ax.plot(steps, sigmas, "o-", label="σ_t")
ax.plot(steps, guess_rewards, "s-", label=f"{REWARD}(x̂_0)")
ax.set_xlabel("step k (t decreases →)")
ax2 = ax.twinx()
ax2.plot(steps, log_probs, "^-", color="tab:green", label="log π(a|s) (mean over dims)")
ax.legend(loc="upper left", fontsize=7)
ax2.legend(loc="upper right", fontsize=7)
fig.suptitle(f"Lesson 1: one episode of the denoising MDP — {PROMPT!r}")
save_figure(fig, "lesson1_denoising_mdp.png")
save_results(
    "lesson1.json", {"reward": float(reward), "sigmas": sigmas, "log_probs": log_probs, "x0_hat_rewards": guess_rewards}
)

# %% [markdown]
# ## Exercises
#
# 1. Make the env with `eta=0.5` (and then `eta=0.1`). What happens to σ_t and to the log-probabilities?
#    Why can the MDP not use η = 0 (try it)?
# 2. Act greedily: pass `step.mean` instead of `step.prev_sample` as the action. Is the image sharper? What
#    is log π of the mean action, and why is it the largest value the density can take?
# 3. From the bottom plot: after how many steps does r(x̂_0) stop changing much? What does that suggest
#    about which timesteps an RL fine-tuning can still change the *count* of shapes at?
