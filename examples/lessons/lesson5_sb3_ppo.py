# %% [markdown]
# # Lesson 5 — Plugging in Stable-Baselines3's PPO
#
# The denoising MDP is an ordinary Gymnasium environment, so an off-the-shelf RL library can train the
# diffusion model. SB3's `PPO` needs two adapters (`diffusion_mdp.envs.sb3`):
#
# - an SB3 `VecEnv`: SB3 stores observations in arrays, so the text prompt is dropped and its index kept;
#   the natively batched vector env is wrapped directly (one UNet batch per step, not N envs);
# - an `ActorCriticPolicy` whose action distribution is the DDIM Gaussian N(μ_θ, σ_t² I), with DDPO's
#   mean-over-dimensions log-prob.
#
# With γ = λ = 1, no critic and no per-minibatch advantage normalisation, SB3's PPO loss *is* DDPO-IS's.
# We check the two facts that make it so, then train.

# %%
import gymnasium as gym
import matplotlib.pyplot as plt
import numpy as np
import torch
from lesson_utils import MODEL, evaluate, pick, save_figure, save_results
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.utils import obs_as_tensor

import diffusion_mdp  # noqa: F401
from diffusion_mdp.envs.sb3 import (
    DenoisingSB3VecEnv,
    DiffusionActorCriticPolicy,
    ddpo_ppo_kwargs,
    diffusion_policy_kwargs,
)

torch.manual_seed(0)
# The task of lesson 2: JPEG compressibility on the 60 shapes_train prompts, the whole UNet trained, big
# rollouts (the policy gradient of a few episodes is mostly noise) and few optimiser steps.
TASK_REWARD = "jpeg_compressibility"  # works for any model (CI's tiny test pipelines too)
N, T, ROLLOUTS = pick(64, 2), pick(10, 2), pick(10, 1)
# 4 episodes of each of N/4 prompts per rollout, so the per-prompt statistics exist from the first batch.
env = DenoisingSB3VecEnv(
    num_envs=N, model=MODEL, reward=TASK_REWARD, prompts="shapes_train", num_steps=T, group_size=pick(4, 2)
)
print("SB3 observation space:", env.observation_space)
model = PPO(
    DiffusionActorCriticPolicy,
    env,
    # DDPO's settings; 2 minibatches per rollout (the second step is off-policy: the clip matters).
    **ddpo_ppo_kwargs(env, batch_size=N * T // pick(2, 1), learning_rate=1e-4, seed=0),
    policy_kwargs=diffusion_policy_kwargs(env, guidance_scale=5.0, lora_rank=None),  # None: the whole UNet
)
for key, value in ddpo_ppo_kwargs(env).items():
    print(f"  {key} = {value}")

# %% [markdown]
# ## Check 1 — SB3's log-prob is the policy's log-prob
#
# SB3 scores actions with `policy.evaluate_actions(obs, actions)`; the library's `DiffusionPolicy.log_prob`
# is what DDPO-IS uses. On the same (observation, action) they must agree.

# %%
obs = env.reset()
with torch.no_grad():
    actions, values, sb3_log_prob = model.policy(obs_as_tensor(obs, "cpu"))
    ours = model.policy.diffusion.log_prob({**obs, "prompt": [env.prompts[i] for i in obs["prompt_id"]]}, actions)
print("SB3 log π:", sb3_log_prob.numpy().round(5), "  DiffusionPolicy.log_prob:", ours.numpy().round(5))
assert torch.allclose(sb3_log_prob, ours, atol=1e-6)

# %% [markdown]
# ## Check 2 — with γ = λ = 1, every step's advantage is the episode's (normalised) terminal reward
#
# SB3's GAE: A_t = Σ_k (γλ)^k δ_{t+k}, δ_t = r_t + γ V(s_{t+1}) - V(s_t). With V ≡ 0 and γ = λ = 1 it sums
# the rewards to the end of the episode: the terminal reward, which the adapter has already normalised per
# prompt (DDPO's stat tracker).

# %%
_, callback = model._setup_learn(N * T, None)
model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=T)
advantages = model.rollout_buffer.advantages  # (T, N)
print("advantages of episode 0 along its T steps:", advantages[:, 0].round(4))
print("the normalised terminal rewards:          ", model.rollout_buffer.rewards[-1].round(4))
assert np.allclose(advantages, model.rollout_buffer.rewards[-1][None], atol=1e-6)

# %% [markdown]
# ## Train with `model.learn`, evaluate on every training prompt with fixed seeds

# %%


class RawRewards(BaseCallback):
    """Record the raw terminal reward of each rollout (SB3's own logger sees it as rollout/ep_rew_mean)."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[float] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.history.append(float(self.training_env.last_raw_rewards.mean()))
        print(f"rollout {len(self.history):2d}: reward {self.history[-1]:.4f}")


eval_env = gym.make_vec(
    "DenoisingMDP-v0",
    num_envs=pick(len(env.prompts), 2),  # every training prompt once
    reward=TASK_REWARD,
    prompts="shapes_train",
    num_steps=T,
    components=env.venv.components,
    autoreset_mode="Disabled",
)
before = evaluate(model.policy.diffusion, eval_env)  # every training prompt once, fixed seeds
recorder = RawRewards()
model.learn(total_timesteps=ROLLOUTS * N * T, callback=recorder)
after = evaluate(model.policy.diffusion, eval_env)
print(f"training-prompt reward (fixed seeds): before {before['mean']:.4f} → after {after['mean']:.4f}")
print({k: round(float(v), 6) for k, v in model.logger.name_to_value.items() if k.startswith("train/")})

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.4))
ax.plot(np.arange(1, len(recorder.history) + 1), recorder.history, "o-", label="training rollouts (raw reward)")
ax.axhline(
    before["mean"], color="tab:red", ls="--", label=f"training prompts, fixed seeds: before {before['mean']:.3f}"
)
ax.axhline(after["mean"], color="tab:green", ls="--", label=f"after {after['mean']:.3f}")
ax.set(
    xlabel="PPO iteration (N episodes each)", ylabel=TASK_REWARD, title="Lesson 5: stock SB3 PPO on the denoising MDP"
)
ax.legend(fontsize=8)
save_figure(fig, "lesson5_sb3_ppo.png")
save_results(
    "lesson5.json", {"train_rewards": recorder.history, "eval_before": before["mean"], "eval_after": after["mean"]}
)

# %% [markdown]
# ## Exercises
#
# 1. Turn SB3's advantage normalisation back on (`normalize_advantage=True`) with the adapter's
#    `reward_normalization="none"`. Which DDPO advantage mode does that resemble, and what is different
#    (hint: which samples share the statistics)?
# 2. Give PPO a critic: `diffusion_policy_kwargs(env, value_head="per_prompt")` with `vf_coef=0.5` and
#    `reward_normalization="none"`. The learned V(c) is a per-prompt baseline. Compare with the stat tracker.
# 3. Set `batch_size` to N·T/4 (four optimiser steps per rollout, each on a random mix of (step, episode)
#    pairs), then to N·T (one step: PPO becomes REINFORCE, lesson 2). How do SB3's minibatches differ from
#    DDPO-IS's (docs/plug_in.md)? Which learns faster per reward query on this task?
