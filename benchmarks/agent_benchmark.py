"""DDPO-IS epoch cost on the reference workload, against the UNet compute floor measured in the same run.

Reference workload: the reference tiny pipeline (random weights, latents 4×32×32), 20 DDIM steps, η = 1,
CFG 5, 16 samples per epoch in 2 batches of 8, train batch 8, LoRA r = 4, lr 3e-4, one inner epoch, JPEG
compressibility.

For each setting (fp32; bf16 autocast; channels_last; ...) it prints seconds per epoch split into sampling
(UNet + DDIM + decode), reward and training, ms per sample-timestep, peak RSS, the ratio of the epoch to the
compute floor, and the log-prob ratio π_θ/π_old at the first minibatch (must be 1 ± 1e-3: sampling and
training must compute the same log-probs). The floor is bare ``unet(...)`` calls at the same batch (16 = 8
samples × 2 CFG branches): 40 forwards for sampling + 40 forward+backward for training.

    python benchmarks/agent_benchmark.py                       # all settings, 2 epochs each (1st = warm-up)
    python benchmarks/agent_benchmark.py --settings fp32,bf16 --epochs 2 --threads 2
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SETTINGS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "bf16": {"mixed_precision": "bf16"},
    "channels_last": {"channels_last": True},
    "bf16+channels_last": {"mixed_precision": "bf16", "channels_last": True},
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def unet_floor(agent: Any, batch: int, repeats: int = 3) -> tuple[float, float]:
    """Seconds of one bare UNet forward, and of one forward+backward (LoRA grads), at ``batch`` (median)."""
    unet = agent.unet
    shape = agent.components.latent_shape
    x = torch.randn(batch, *shape)
    if agent.config.channels_last:
        x = x.to(memory_format=torch.channels_last)
    t = torch.full((batch,), 500)
    embeds = agent.policy.encode_prompts([""] * batch)
    fwd, fwdbwd = [], []
    for _ in range(repeats):
        with torch.no_grad(), agent.autocast():
            start = time.perf_counter()
            unet(x, t, encoder_hidden_states=embeds)
            fwd.append(time.perf_counter() - start)
        start = time.perf_counter()
        with agent.autocast():
            out = unet(x, t, encoder_hidden_states=embeds).sample
        out.float().square().mean().backward()
        fwdbwd.append(time.perf_counter() - start)
        agent.optimizer.zero_grad(set_to_none=True)
    return float(np.median(fwd)), float(np.median(fwdbwd))


def run_setting(name: str, changes: dict[str, Any], pipeline: Path, epochs: int, threads: int) -> dict[str, Any]:
    from diffusion_mdp.agents import TrainConfig, make_agent

    out = tempfile.mkdtemp()
    cfg = TrainConfig(
        name=name,
        output_dir=out,
        model=str(pipeline),
        prompts="imagenet_animals",
        reward="jpeg_compressibility",
        num_steps=20,
        eta=1.0,
        guidance_scale=5.0,
        samples_per_epoch=16,
        sample_batch_size=8,
        train_batch_size=8,
        num_inner_epochs=1,
        use_lora=True,
        lora_rank=4,
        learning_rate=3e-4,
        num_epochs=epochs,
        eval_num_samples=0,
        image_every=0,
        progress_bar=False,
        num_threads=threads,
        log_formats="csv",
        **changes,
    )
    agent = make_agent(cfg)
    reward_time = [0.0]
    reward_fn = agent.mdp.reward_fn

    def timed_reward(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return reward_fn(*args)
        finally:
            reward_time[0] += time.perf_counter() - start

    agent.mdp.reward_fn = timed_reward
    rows = []
    for epoch in range(epochs):
        reward_time[0] = 0.0
        t0 = time.perf_counter()
        agent.collect_rollouts(epoch)
        t1 = time.perf_counter()
        metrics = agent.train_on_rollouts(epoch)
        t2 = time.perf_counter()
        rows.append((t1 - t0 - reward_time[0], reward_time[0], t2 - t1, metrics["first_ratio"]))
    measured = rows[1:] or rows  # the first epoch warms up allocators and kernels
    sampling, reward, training = (float(np.mean([r[i] for r in measured])) for i in range(3))
    fwd, fwdbwd = unet_floor(agent, 2 * cfg.sample_batch_size)  # CFG doubles the UNet batch
    num_batches = cfg.samples_per_epoch // cfg.sample_batch_size
    floor = num_batches * cfg.num_steps * (fwd + fwdbwd)
    epoch_s = sampling + reward + training
    sample_steps = cfg.samples_per_epoch * cfg.num_steps
    return {
        "setting": name,
        "epoch_s": epoch_s,
        "sampling_s": sampling,
        "reward_s": reward,
        "training_s": training,
        "ms_per_sample_step": 1000 * epoch_s / sample_steps,
        "floor_s": floor,
        "floor_fwd_ms": 1000 * fwd,
        "floor_fwdbwd_ms": 1000 * fwdbwd,
        "ratio_to_floor": epoch_s / floor,
        "first_ratio": rows[0][3],
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per setting (the first is a warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    from diffusion_mdp.testing import build_reference_tiny_pipeline

    pipeline = build_reference_tiny_pipeline(Path(tempfile.mkdtemp()) / "reference")
    print(f"torch {torch.__version__}, {args.threads} threads, reference workload (see the module docstring)")
    header = (
        f"{'setting':<20}{'epoch s':>9}{'sample':>9}{'reward':>8}{'train':>9}{'ms/smp-step':>12}"
        f"{'floor s':>9}{'x floor':>8}{'ratio@mb0':>12}{'RSS MiB':>9}"
    )
    print(header)
    results = []
    for name in args.settings.split(","):
        r = run_setting(name, SETTINGS[name], pipeline, args.epochs, args.threads)
        results.append(r)
        print(
            f"{r['setting']:<20}{r['epoch_s']:>9.2f}{r['sampling_s']:>9.2f}{r['reward_s']:>8.3f}{r['training_s']:>9.2f}"
            f"{r['ms_per_sample_step']:>12.1f}{r['floor_s']:>9.2f}{r['ratio_to_floor']:>8.2f}"
            f"{r['first_ratio']:>12.6f}{r['peak_rss_mib']:>9.0f}",
            flush=True,
        )
        print(f"    floor: UNet fwd {r['floor_fwd_ms']:.1f} ms, fwd+bwd {r['floor_fwdbwd_ms']:.1f} ms at batch 16")
    fp32 = next((r for r in results if r["setting"] == "fp32"), None)
    if fp32 is not None:  # "below the fp32 floor": every setting's epoch against the fp32 compute floor
        ratios = [f"{r['setting']} {r['epoch_s'] / fp32['floor_s']:.2f}" for r in results]
        print("epoch time / fp32 floor: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
