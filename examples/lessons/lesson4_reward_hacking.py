# %% [markdown]
# # Lesson 4 — Reward hacking
#
# RL maximises the reward you wrote, not the one you meant. Here DDPO-IS (the library's agent) optimises
# **JPEG incompressibility** — the size of the image as a JPEG, a stand-in for "detail" — on tiny-shapes
# prompts, while we watch a reward we did not optimise: prompt alignment (does the image still show "three
# red circles"?). The cheapest way to make a JPEG big is noise and hard edges, and the policy finds it.
#
# The loop is written out with the agent's two methods — `collect_rollouts` (sample, score, fill the
# buffer) and `train_on_rollouts` (the DDPO-IS update) — which is all `agent.learn()` does per epoch, plus
# logging and checkpoints.

# %%
import shutil

import matplotlib.pyplot as plt
import numpy as np
from lesson_utils import MODEL, OUT, REWARD, pick, save_figure, save_results, show_images

from diffusion_mdp.agents import build_config, make_agent
from diffusion_mdp.rewards import make_reward

HACKED = "jpeg_incompressibility"
WATCHED = REWARD  # prompt_alignment on tiny-shapes
EPOCHS = pick(10, 1)
run_dir = OUT / "lesson4_run"
shutil.rmtree(run_dir, ignore_errors=True)
config = build_config(
    preset="tiny-shapes",
    model=MODEL or "tiny-shapes",
    reward=HACKED,
    name="lesson4_run",
    output_dir=str(OUT),
    num_epochs=EPOCHS,
    num_steps=pick(10, 2),
    samples_per_epoch=pick(32, 2),
    sample_batch_size=pick(16, 2),
    train_batch_size=pick(16, 2),
    gradient_accumulation_steps=1,
    num_inner_epochs=pick(2, 1),
    learning_rate=5e-4,  # large enough that the hacking shows within a few epochs (1e-3 breaks it at once)
    use_lora=False,  # full fine-tuning: the LoRA on a few attention layers is slower to break the images
    eval_num_samples=pick(8, 2),
    progress_bar=False,
    log_formats="csv",
    num_threads=0,  # keep the lesson's thread setting
)
agent = make_agent(config)
watched = make_reward(WATCHED)

# %% [markdown]
# ## Train, and score every batch with both rewards

# %%
before = agent.evaluate()  # η = 0 from fixed noise on held-out prompts
watched_before, _ = watched(before["images"], before["prompts"], [{} for _ in before["prompts"]])
history = {"epoch": [], HACKED: [], WATCHED: []}
for epoch in range(EPOCHS):
    stats = agent.collect_rollouts(epoch)  # fills agent.buffer; images in agent.last_images
    agent.train_on_rollouts(epoch)
    images, prompts, _ = agent.last_images
    watched_reward, _ = watched(images, prompts, [{} for _ in prompts])
    history["epoch"].append(epoch + 1)
    history[HACKED].append(stats["reward_mean"])
    history[WATCHED].append(float(np.mean(watched_reward)))
    print(f"epoch {epoch + 1:2d}: {HACKED} {stats['reward_mean']:.3f}   {WATCHED} {np.mean(watched_reward):.3f}")
after = agent.evaluate()
watched_after, _ = watched(after["images"], after["prompts"], [{} for _ in after["prompts"]])
print(f"held-out {HACKED}: {before['eval_reward_mean']:.3f} → {after['eval_reward_mean']:.3f}")
print(f"held-out {WATCHED}: {np.mean(watched_before):.3f} → {np.mean(watched_after):.3f}")

# %%
n = len(before["images"])
fig = plt.figure(figsize=(max(8, 1.3 * n), 6))
grid = fig.add_gridspec(3, n, height_ratios=[1, 1, 1.6])
short = [p.replace("three", "3").replace("four", "4").replace("two", "2") for p in before["prompts"]]
show_images([fig.add_subplot(grid[0, i]) for i in range(n)], before["images"], [f"before:\n{p}" for p in short])
show_images([fig.add_subplot(grid[1, i]) for i in range(n)], after["images"], ["after"] * n)
ax = fig.add_subplot(grid[2, :])
ax.plot(history["epoch"], history[HACKED], "o-", color="tab:red", label=f"{HACKED} (optimised), kB")
ax.set(xlabel="epoch", ylabel=HACKED)
ax2 = ax.twinx()
ax2.plot(history["epoch"], history[WATCHED], "s-", color="tab:blue", label=f"{WATCHED} (watched)")
ax2.set_ylabel(WATCHED)
ax.legend(loc="upper left", fontsize=8)
ax2.legend(loc="lower left", fontsize=8)
fig.suptitle("Lesson 4: optimising JPEG incompressibility — the reward goes up, the images stop being shapes")
save_figure(fig, "lesson4_reward_hacking.png")
save_results(
    "lesson4.json",
    {
        "history": history,
        "eval_hacked_before": before["eval_reward_mean"],
        "eval_hacked_after": after["eval_reward_mean"],
        "eval_watched_before": float(np.mean(watched_before)),
        "eval_watched_after": float(np.mean(watched_after)),
    },
)

# %% [markdown]
# ## Exercises
#
# 1. Add a KL penalty to the pre-trained model (`use_lora=True, kl_coef=...`; the reference is the UNet
#    with its LoRA disabled). How large must `kl_coef` be to keep the watched reward, and how much of the
#    JPEG gain is left?
# 2. Hack the captioner instead: optimise `strict_alignment` for many epochs with a large learning rate and
#    look at the images — are they still shapes a person would count the same way? (The captioner has
#    only ever seen clean procedural images.)
# 3. Optimise `{"jpeg_incompressibility": 1, "prompt_alignment": 10}` (a weighted sum, `make_reward`). Does
#    one weight setting keep both? What does this say about reward design?
