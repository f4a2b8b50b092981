# %% [markdown]
# # Lesson 4 — Reward hacking
#
# RL maximises the reward you wrote, not the one you meant. The paper trains on a vision-language model's
# answer to "does this image show the prompt?"; here the stand-in is the bundled **captioner**, a small
# network that reads count, colour and shape off an image (`strict_alignment`: 1 when all three match the
# prompt). DDPO-IS (the library's agent, the main job's recipe) optimises it on "four <colour> <shape>s",
# while we watch a reward it never sees: the procedural **judge** `shapes_geneval`, which counts the objects
# exactly (100 % right on procedural ground truth). The captioner is generous where it matters: it reads
# the base model's fives and threes as "four" most of the time, so it calls ~98 % of the images right where
# the judge finds ~46 %. Whatever raises the captioner's score a little further is what the policy learns,
# whether or not there are four shapes.
#
# The loop is written out with the agent's two methods — `collect_rollouts` (sample, score, fill the
# buffer) and `train_on_rollouts` (the DDPO-IS update) — which is all `agent.learn()` does per epoch, plus
# logging and checkpoints. The prompts, the captioner and the judge belong to the bundled tiny-shapes world,
# so this lesson runs on that model (``LESSON_MODEL`` must be a tiny-shapes pipeline).

# %%
import shutil

import matplotlib.pyplot as plt
import numpy as np
from lesson_utils import MODEL, OUT, pick, save_figure, save_results, show_images

from diffusion_mdp.agents import build_config, make_agent
from diffusion_mdp.rewards import make_reward

HACKED = "strict_alignment"  # the captioner: what the agent optimises
WATCHED = "shapes_geneval"  # the judge: what we meant
PROMPTS = "shapes_four_rl_train"  # 12 "four <colour> <shape>s" prompts
EPOCHS = pick(10, 1)
run_dir = OUT / "lesson4_run"
shutil.rmtree(run_dir, ignore_errors=True)
config = build_config(
    preset="tiny-shapes-counting",  # the main job's recipe: full fine-tuning, 8 PPO-clip updates per epoch
    model=MODEL or "tiny-shapes",
    reward=HACKED,
    prompts=PROMPTS,
    eval_prompts=PROMPTS,
    name="lesson4_run",
    output_dir=str(OUT),
    num_epochs=EPOCHS,
    num_steps=pick(10, 2),
    samples_per_epoch=pick(128, 4),
    sample_batch_size=pick(32, 4),
    train_batch_size=pick(32, 4),
    timestep_fraction=0.5,  # each update trains half of a trajectory's steps: the same story in 2/3 of the time
    learning_rate=1e-4,  # with half the steps, the main job's lr 1.5e-4 (after its warm-up) was unstable
    lr_warmup_steps=0,
    eval_num_samples=pick(12, 2),  # one image per prompt, the same noise before and after
    progress_bar=False,
    log_formats="csv",
    num_threads=0,  # keep the lesson's thread setting
)
agent = make_agent(config)
judge = make_reward(WATCHED)


def judged(images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The judge's verdicts (B,) in {0, 1} and the number of objects it found in each image (B,)."""
    verdict, info = judge(images, prompts, [{} for _ in prompts])
    return np.asarray(verdict), np.asarray(info["num_objects"]).astype(int)


# %% [markdown]
# ## Train, and score every batch with both rewards

# %%
before = agent.evaluate()  # η = 0 from fixed noise: one image per prompt
judge_before, objects_before = judged(before["images"], before["prompts"])
history = {"epoch": [], HACKED: [], WATCHED: [], "objects": []}
for epoch in range(EPOCHS):
    stats = agent.collect_rollouts(epoch)  # fills agent.buffer; the batch's images in agent.last_images
    agent.train_on_rollouts(epoch)
    images, prompts, _ = agent.last_images
    verdict, objects = judged(images, prompts)
    history["epoch"].append(epoch + 1)
    history[HACKED].append(stats["reward_mean"])
    history[WATCHED].append(float(verdict.mean()))
    history["objects"].append(np.bincount(objects, minlength=8)[:8].tolist())  # images with 0..7 objects
    print(f"epoch {epoch + 1:2d}: captioner {stats['reward_mean']:.3f}   judge {verdict.mean():.3f}   "
          f"objects drawn 3/4/5: {history['objects'][-1][3:6]}")  # fmt: skip
after = agent.evaluate()
judge_after, objects_after = judged(after["images"], after["prompts"])
print(f"fixed noise, captioner: {before['eval_reward_mean']:.3f} → {after['eval_reward_mean']:.3f}")
print(f"fixed noise, judge:     {judge_before.mean():.3f} → {judge_after.mean():.3f}")

# %%
n = len(before["images"])
fig = plt.figure(figsize=(max(8, 1.2 * n), 6.5))
grid = fig.add_gridspec(3, n, height_ratios=[1, 1, 1.6])
short = [p.replace("four ", "") for p in before["prompts"]]
show_images([fig.add_subplot(grid[0, i]) for i in range(n)], before["images"],
            [f"{p}\n{k} objects" for p, k in zip(short, objects_before, strict=True)])  # fmt: skip
show_images([fig.add_subplot(grid[1, i]) for i in range(n)], after["images"], [f"{k} objects" for k in objects_after])
ax = fig.add_subplot(grid[2, :])
ax.plot(history["epoch"], history[HACKED], "o-", color="tab:red", label="captioner's strict alignment (optimised)")
ax.plot(history["epoch"], history[WATCHED], "s-", color="tab:blue", label="judge's accuracy (watched, never optimised)")
ax.set(xlabel="epoch", ylabel="fraction of the epoch's 128 samples right", ylim=(0, 1.02))
ax.legend(loc="center right", fontsize=8)
fig.suptitle("Lesson 4: optimising a captioner that cannot count past four (objects counted by the judge)\n"
             f"top: before; middle: after {EPOCHS} epochs, the same noise; bottom: each epoch's samples, both rewards")
save_figure(fig, "lesson4_reward_hacking.png")
save_results(
    "lesson4.json",
    {
        "history": history,
        "eval_hacked_before": before["eval_reward_mean"],
        "eval_hacked_after": after["eval_reward_mean"],
        "eval_watched_before": float(judge_before.mean()),
        "eval_watched_after": float(judge_after.mean()),
    },
)

# %% [markdown]
# ## Exercises
#
# 1. Count what changed: `history["objects"]` holds, per epoch, how many images had 0..7 objects. Which count
#    does the policy move towards, and why would the captioner not mind?
# 2. Train on the judge instead (`reward="shapes_geneval"`) for the same 10 epochs and watch the captioner.
#    Does the captioner's score fall, and what does that say about using one model to check another?
# 3. Make the reward harder to hack: `{"strict_alignment": 1, "shapes_geneval": 1}` (a weighted sum,
#    `make_reward`). Which one does the policy follow, and how much of the judge's gain is left?
