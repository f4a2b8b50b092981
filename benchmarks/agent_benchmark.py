"""DDPO-IS epoch cost of this project's agent against the plain loop (``plain_ddpo.py``), measured in one run.

Reference workload: 20 DDIM steps, η = 1, CFG 5, 16 samples per epoch in 2 batches of 8, train batch 8,
LoRA r = 4, lr 3e-4, one inner epoch, JPEG compressibility; on three models (``bench_models.py``): the
reference tiny pipeline, the bundled tiny-shapes model, and a tiny SD pipeline with attention at the lower
resolution only.

Every (model, setting) runs in its own subprocess (so that its peak RSS is its own and no allocator state
carries over), ``--epochs`` epochs of which the first is a warm-up; the settings are interleaved: round r
runs every setting of every model once before round r + 1 starts. It prints, per model and setting, the
median over rounds of the epoch time (sampling without the reward + reward + training), the median of the
per-round ratio to the plain loop's epoch *of the same round*, the importance ratio π_θ/π_old at the first
minibatch (must be 1 ± 1e-3: sampling and training must compute the same log-probs), and the peak RSS.
The machine is shared: quote the ratios, not the seconds, and the load it prints.

    python benchmarks/agent_benchmark.py                          # every model and setting, 2 rounds
    python benchmarks/agent_benchmark.py --models tiny-shapes --settings plain,fp32,bf16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_models import MODELS, PROMPTS, build_model

# "plain" is the baseline loop of plain_ddpo.py; the others are TrainConfig changes of this project's agent.
SETTINGS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "fp32": {},
    "bf16": {"mixed_precision": "bf16"},
    "bf16+channels_last": {"mixed_precision": "bf16", "channels_last": True},
    "merged": {"merge_lora_for_sampling": True},
    "bf16+merged": {"mixed_precision": "bf16", "merge_lora_for_sampling": True},
    # Not an implementation setting: the update trains on half of each trajectory's timesteps (the authors'
    # timestep_fraction), i.e. less of the algorithm's work: on the counting task it gains the same over 5 seeds
    # of 10 epochs (docs/results/is-tf0.5) but less on the training pairs in the 24-epoch main job (README).
    "half-timesteps": {"timestep_fraction": 0.5},
    # The backward pass runs through the conditional branch of guidance only (ε_∅ without gradient): the same
    # forward values, a semi-gradient instead of the exact one (TrainConfig.unconditional_gradient).
    "cond-grad": {"unconditional_gradient": False},
    "cond-grad+half-timesteps": {"unconditional_gradient": False, "timestep_fraction": 0.5},
    # c of each trajectory's timesteps stacked into one forward/backward (TrainConfig.timesteps_per_forward): the
    # same gradient from fewer, larger UNet calls (at the workload's train batch of 8, 16 rows a call at c = 1).
    "stack5": {"timesteps_per_forward": 5},
    "stack10": {"timesteps_per_forward": 10},
    "cond-grad+stack10": {"unconditional_gradient": False, "timesteps_per_forward": 10},
}
DEFAULT_SETTINGS = ("plain", "fp32", "merged", "bf16", "bf16+merged")
WORKLOAD = {
    "num_steps": 20,
    "eta": 1.0,
    "guidance_scale": 5.0,
    "samples_per_epoch": 16,
    "sample_batch_size": 8,
    "train_batch_size": 8,
    "lora_rank": 4,
    "learning_rate": 3e-4,
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_plain(model: str, prompts: str, epochs: int, workload: dict[str, Any]) -> list[dict[str, float]]:
    from plain_ddpo import PlainConfig, PlainDDPO

    from diffusion_mdp.prompts import load_prompts

    plain = PlainDDPO(model, load_prompts(prompts).prompts, PlainConfig(**workload))
    return [plain.run_epoch(epoch) for epoch in range(epochs)]


def run_agent(
    model: str, prompts: str, epochs: int, workload: dict[str, Any], changes: dict[str, Any], threads: int
) -> list[dict[str, float]]:
    from diffusion_mdp.agents import TrainConfig, make_agent

    cfg = TrainConfig(
        name="bench",
        output_dir=tempfile.mkdtemp(),
        model=model,
        prompts=prompts,
        reward="jpeg_compressibility",
        num_inner_epochs=1,
        use_lora=True,
        num_epochs=epochs,
        eval_num_samples=0,
        image_every=0,
        progress_bar=False,
        num_threads=threads,
        log_formats="csv",
        **workload,
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
        rows.append(
            {
                "sampling_s": t1 - t0 - reward_time[0],
                "reward_s": reward_time[0],
                "training_s": t2 - t1,
                "first_ratio": metrics["first_ratio"],
            }
        )
    return rows


def worker(args: argparse.Namespace) -> None:
    """One (model, setting): prints a JSON line with the measured epochs' means and the peak RSS."""
    torch.set_num_threads(args.threads)
    workload = {**WORKLOAD, **json.loads(args.workload)}
    changes = SETTINGS[args.setting]
    if changes is None:
        rows = run_plain(args.model, args.prompts, args.epochs, workload)
    else:
        rows = run_agent(args.model, args.prompts, args.epochs, workload, changes, args.threads)
    measured = rows[1:] or rows  # the first epoch warms up allocators and kernels
    result = {key: float(np.mean([r[key] for r in measured])) for key in ("sampling_s", "reward_s", "training_s")}
    result["epoch_s"] = result["sampling_s"] + result["reward_s"] + result["training_s"]
    result["first_ratio"] = rows[0]["first_ratio"]
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (the first is a warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats of every (model, setting)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--workload", default="{}", help="JSON changes to the workload, e.g. '{\"num_steps\": 10}'")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    settings, models = args.settings.split(","), args.models.split(",")
    unknown = [s for s in settings if s not in SETTINGS] + [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown settings/models {unknown}: choose from {list(SETTINGS)} and {list(MODELS)}")
    if "plain" not in settings:
        settings.insert(0, "plain")  # every ratio is to the plain loop of the same round
    folder = tempfile.mkdtemp()
    paths = {m: build_model(m, folder) for m in models}
    workload = {**WORKLOAD, **json.loads(args.workload)}
    print(
        f"torch {torch.__version__}, {args.threads} threads, workload {workload}, {args.rounds} rounds, "
        f"{args.epochs} epochs per run (first = warm-up); load average at start {os.getloadavg()}",
        flush=True,
    )
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    loads = []
    for rnd in range(args.rounds):
        for model in models:
            for setting in settings:
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--model",
                    paths[model],
                    "--prompts",
                    PROMPTS[model],
                    "--setting",
                    setting,
                    "--epochs",
                    str(args.epochs),
                    "--threads",
                    str(args.threads),
                    "--workload",
                    args.workload,
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise RuntimeError(f"{model}/{setting} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(line[len("RESULT ") :])
                results.setdefault((model, setting), []).append(r)
                loads.append(os.getloadavg()[0])
                print(
                    f"round {rnd + 1} {model:<12}{setting:<20} epoch {r['epoch_s']:7.2f} s  "
                    f"(sample {r['sampling_s']:.2f} reward {r['reward_s']:.3f} train {r['training_s']:.2f})  "
                    f"ratio@mb0 {r['first_ratio']:.6f}  RSS {r['peak_rss_mib']:.0f} MiB  load {loads[-1]:.1f}",
                    flush=True,
                )
    print(f"\nload average (1 min) during the runs: {min(loads):.1f}-{max(loads):.1f}")
    print(
        "| model | setting | epoch s | sampling / reward / training s | × plain | ratio at 1st minibatch "
        "| peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for model in models:
        plain = results[(model, "plain")]
        for setting in settings:
            rs = results[(model, setting)]
            ratio = float(np.median([r["epoch_s"] / p["epoch_s"] for r, p in zip(rs, plain, strict=True)]))
            med = {k: float(np.median([r[k] for r in rs])) for k in ("epoch_s", "sampling_s", "reward_s", "training_s")}
            worst = max(rs, key=lambda r: abs(r["first_ratio"] - 1))["first_ratio"]
            print(
                f"| {model} | {setting} | {med['epoch_s']:.2f} | {med['sampling_s']:.2f} / {med['reward_s']:.3f} / "
                f"{med['training_s']:.2f} | {ratio:.2f} | {worst:.6f} | "
                f"{max(r['peak_rss_mib'] for r in rs):.0f} |"
            )


if __name__ == "__main__":
    main()
