# %% [markdown]
# # Lesson 2 — Policy gradients from scratch
#
# The objective is the expected reward J(θ) = E_{τ ~ π_θ}[r(τ)]. Its gradient needs no derivative of the
# reward (the reward may be a JPEG encoder or a captioner, neither differentiable):
#
#     ∇J(θ) = E[ (r(τ) - b) Σ_t ∇ log π_θ(a_t | s_t) ]         (the score function / REINFORCE estimator)
#
# for any baseline b that does not depend on the actions. Part A checks this on a 1-D toy where the true
# gradient is known; part B applies the same ten lines to the denoising MDP (DDPO-SF).

# %%
import gymnasium as gym
import matplotlib.pyplot as plt
import numpy as np
import torch
from lesson_utils import MODEL, evaluate, pick, save_figure, save_results

import diffusion_mdp  # noqa: F401
from diffusion_mdp.policy import DiffusionPolicy

torch.manual_seed(0)

# %% [markdown]
# ## A. A one-dimensional policy
#
# π_μ(a) = N(μ, 1), reward r(a) = -(a - 3)². Then J(μ) = -(μ - 3)² - 1 and ∇J = -2(μ - 3), exactly.
# The score is ∇_μ log π_μ(a) = (a - μ). Compare the estimator with and without a baseline.

# %%
mu = torch.tensor(0.0, requires_grad=True)
a = (mu + torch.randn(10_000)).detach()
r = -((a - 3) ** 2)
log_pi = torch.distributions.Normal(mu, 1.0).log_prob(a)
per_sample_no_baseline = (r * (a - mu)).detach()  # the score-function terms, one per sample
per_sample_baseline = ((r - r.mean()) * (a - mu)).detach()
(-(r * log_pi).mean()).backward()  # autograd gives the same estimate as the formula
print(f"true ∇J = {-2 * (0 - 3):.3f}")
print(f"estimate (autograd)  = {-mu.grad.item():.3f}")
print(
    f"estimate, no baseline = {per_sample_no_baseline.mean():.3f}   per-sample std {per_sample_no_baseline.std():.2f}"
)
print(f"estimate, baseline    = {per_sample_baseline.mean():.3f}   per-sample std {per_sample_baseline.std():.2f}")

# Gradient ascent with 8 samples per step: the baseline is what makes small batches usable.
toy_curves = {}
for use_baseline in (False, True):
    mu = torch.tensor(0.0, requires_grad=True)
    opt = torch.optim.SGD([mu], lr=0.02)
    curve = []
    for _ in range(pick(150, 10)):
        a = (mu + torch.randn(8)).detach()
        r = -((a - 3) ** 2)
        advantage = r - r.mean() if use_baseline else r
        loss = -(advantage * torch.distributions.Normal(mu, 1.0).log_prob(a)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(mu.item())
    toy_curves["with baseline" if use_baseline else "no baseline"] = curve

# %% [markdown]
# ## B. REINFORCE on the denoising MDP
#
# Every denoising step is an action; all steps of an episode share its terminal reward. The loop: sample N
# episodes — k = 4 of each of N/k prompts —, subtract a baseline (the mean reward of the *same prompt's*
# samples: prompts differ in difficulty, lesson 6), and descend -mean_i Σ_t A_i log π_θ(a_t^i | s_t^i) / T.
# No division by the std: when a prompt's k rewards are nearly equal, dividing by their std would turn
# reward noise into full-size advantages. The task is the paper's first, JPEG compressibility (reward =
# minus the JPEG size in kB); the whole UNet is trained.
#
# Two choices matter more than anything else here. **Big batches**: one batch's policy gradient is mostly
# noise (part A's per-sample std, times a 4M-parameter model), so each step averages N = 64 episodes ×
# T steps. **Few, small steps**: Adam moves every weight by about lr per step whatever the signal, so
# many steps on noisy gradients random-walk the model away (docs/agents.md, "Tuning on tiny-shapes").

# %%
TASK_REWARD = "jpeg_compressibility"  # works for any model (CI's tiny test pipelines too)
N, K, T, EPOCHS = pick(64, 2), pick(4, 2), pick(10, 2), pick(10, 1)
env = gym.make_vec(
    "DenoisingMDP-v0",
    num_envs=N,
    model=MODEL,
    reward=TASK_REWARD,
    prompts="shapes_train",
    num_steps=T,
    autoreset_mode="Disabled",
)
NUM_PROMPTS = len(env.unwrapped.mdp.prompts)  # 60 colour–shape–count prompts
eval_env = gym.make_vec(  # every training prompt once, fixed seeds
    "DenoisingMDP-v0",
    num_envs=pick(NUM_PROMPTS, 2),
    reward=TASK_REWARD,
    prompts="shapes_train",
    num_steps=T,
    components=env.unwrapped.components,
    autoreset_mode="Disabled",
)
policy = DiffusionPolicy.from_env(env, guidance_scale=5.0)
policy.unet.requires_grad_(True)  # the whole UNet (add_lora(policy.unet, rank=4) would train an adapter only)
params = [p for p in policy.unet.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)

before = evaluate(policy, eval_env)
train_rewards = []
for epoch in range(EPOCHS):
    prompt_ids = np.repeat(np.random.default_rng(epoch).choice(NUM_PROMPTS, N // K, replace=False), K)
    obs, _ = env.reset(seed=epoch, options={"prompt_ids": prompt_ids})
    trajectory, terminated = [], np.zeros(N, dtype=bool)
    with torch.no_grad():
        while not terminated.all():
            actions, _ = policy.sample(obs)
            trajectory.append((obs, actions))
            obs, rewards, terminated, _, _ = env.step(actions)
    centred = rewards - rewards.reshape(-1, K).mean(axis=1).repeat(K)  # minus the same prompt's mean
    advantages = torch.as_tensor(10.0 * centred, dtype=torch.float32)  # a fixed scale, not 1 / std
    for step_obs, step_actions in trajectory:  # one backward per step: only one step's activations in memory
        loss = -(advantages * policy.log_prob(step_obs, step_actions)).mean() / T
        loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    train_rewards.append(float(rewards.mean()))
    print(f"epoch {epoch + 1:2d}: mean reward {rewards.mean():.4f}")
after = evaluate(policy, eval_env)
print(f"training prompts (fixed seeds) reward: before {before['mean']:.4f} → after {after['mean']:.4f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
for label, curve in toy_curves.items():
    axes[0].plot(curve, label=label)
axes[0].axhline(3, color="gray", ls=":", label="optimum μ = 3")
axes[0].set(title="A: REINFORCE on N(μ, 1), 8 samples/step", xlabel="gradient step", ylabel="μ")
axes[0].legend(fontsize=8)
axes[1].plot(np.arange(1, EPOCHS + 1), train_rewards, "o-", label="training batch (fresh samples)")
axes[1].axhline(
    before["mean"], color="tab:red", ls="--", label=f"training prompts, fixed seeds: before {before['mean']:.3f}"
)
axes[1].axhline(after["mean"], color="tab:green", ls="--", label=f"after {after['mean']:.3f}")
axes[1].set(title=f"B: REINFORCE on the MDP ({TASK_REWARD})", xlabel="epoch", ylabel="reward")
axes[1].legend(fontsize=8)
fig.suptitle("Lesson 2: policy gradients from scratch")
save_figure(fig, "lesson2_policy_gradients.png")
save_results(
    "lesson2.json",
    {
        "toy_final_mu": {k: v[-1] for k, v in toy_curves.items()},
        "train_rewards": train_rewards,
        "eval_before": before["mean"],
        "eval_after": after["mean"],
    },
)

# %% [markdown]
# ## Exercises
#
# 1. In part A, replace the baseline r.mean() by a constant 100. Is the estimate still unbiased? What happens
#    to its variance, and to the learning curve?
# 2. In part B, replace the per-prompt baseline by the batch mean, then drop the baseline altogether (every
#    reward is positive: what does the gradient push towards?). Compare the learning curves.
# 3. Halve N and double EPOCHS (the same number of reward queries, twice the steps), then double the learning
#    rate instead. Which change hurts, and why (benchmarks/gradient_check.py measures the gradient noise)?
