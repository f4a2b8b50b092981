"""Scaling of the vector env and of a training epoch with the number of envs and the number of steps.

On the bundled tiny-shapes model (what users run), each point runs in its own process (its peak RSS is its
own): the vector env's rollout of N episodes of T steps (policy.sample + env.step, VAE decode and reward
included) and a DDPO-IS epoch of N samples (one sample batch of N, train batch N, full workload: sampling +
training), reported as samples/s and peak RSS. Writes ``docs/benchmarks/scaling.md`` (a Markdown table) and
``docs/benchmarks/scaling.png``. A run's cost is epochs × samples per epoch / (epoch samples/s): the table
shows where samples/s stops growing with N, beyond which the cost grows linearly with samples per epoch.

    python benchmarks/scaling.py                                  # envs 1,4,16,64 at T=10; T 10,20,50 at N=16
    python benchmarks/scaling.py --envs 1,8 --steps 10 --out /tmp/scaling
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

import torch


def point(kind: str, num_envs: int, num_steps: int, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    if kind == "env":
        import gymnasium as gym

        import diffusion_mdp  # noqa: F401
        from diffusion_mdp.policy import DiffusionPolicy

        env = gym.make_vec("DenoisingMDP-v0", num_envs=num_envs, num_steps=num_steps, torch_obs=True)
        policy = DiffusionPolicy.from_env(env)
        seconds = []
        for seed in range(2):  # the first rollout warms up
            obs, _ = env.reset(seed=seed)
            start = time.perf_counter()
            done = False
            while not done:
                actions, _ = policy.sample(obs)
                obs, _, terminations, _, _ = env.step(actions)
                done = bool(terminations[0])
            seconds.append(time.perf_counter() - start)
        elapsed = seconds[-1]
    else:
        from diffusion_mdp.agents import TrainConfig, make_agent

        cfg = TrainConfig(
            output_dir=tempfile.mkdtemp(),
            model="tiny-shapes",
            num_steps=num_steps,
            samples_per_epoch=num_envs,
            sample_batch_size=num_envs,
            train_batch_size=num_envs,
            num_epochs=2,
            eval_num_samples=0,
            image_every=0,
            progress_bar=False,
            log_formats="csv",
            use_lora=False,
            learning_rate=5e-5,
            stat_min_count=1,
        )
        agent = make_agent(cfg)
        seconds = []
        for epoch in range(2):
            start = time.perf_counter()
            agent.collect_rollouts(epoch)
            agent.train_on_rollouts(epoch)
            seconds.append(time.perf_counter() - start)
        elapsed = seconds[-1]
    return {
        "samples_per_s": num_envs / elapsed,
        "seconds": elapsed,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", default="1,4,16,64", help="numbers of envs, at the first --steps value")
    parser.add_argument("--steps", default="10,20,50", help="numbers of steps, at --steps-envs envs")
    parser.add_argument("--steps-envs", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks")
    parser.add_argument("--point", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        kind, n, t = args.point
        print("RESULT " + json.dumps(point(kind, int(n), int(t), args.threads)))
        return
    envs = [int(x) for x in args.envs.split(",")]
    steps = [int(x) for x in args.steps.split(",")]
    grid = [(n, steps[0]) for n in envs] + [
        (args.steps_envs, t) for t in steps if (args.steps_envs, t) not in [(n, steps[0]) for n in envs]
    ]
    rows = []
    for n, t in grid:
        row = {"num_envs": n, "num_steps": t, "load": os.getloadavg()[0]}
        for kind in ("env", "epoch"):
            proc = subprocess.run(
                [sys.executable, __file__, "--point", kind, str(n), str(t), "--threads", str(args.threads)],
                capture_output=True,
                text=True,
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"{kind} N={n} T={t} failed:\n{proc.stderr[-2000:]}")
            row.update({f"{kind}_{k}": v for k, v in json.loads(line[7:]).items()})
        rows.append(row)
        print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"Measured with `python benchmarks/scaling.py --envs {args.envs} --steps {args.steps}` "
        f"(tiny-shapes, {args.threads} threads, shared 2-core machine, 1-min load {min(r['load'] for r in rows):.1f}"
        f"-{max(r['load'] for r in rows):.1f}: absolute numbers are noisy).",
        "",
        "| envs N | steps T | env samples/s | env peak RSS MiB | epoch samples/s | epoch s | epoch peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['num_envs']} | {r['num_steps']} | {r['env_samples_per_s']:.2f} | {r['env_peak_rss_mib']:.0f} "
            f"| {r['epoch_samples_per_s']:.2f} | {r['epoch_seconds']:.1f} | {r['epoch_peak_rss_mib']:.0f} |"
        )
    (args.out / "scaling.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    by_n = [r for r in rows if r["num_steps"] == steps[0]]
    by_t = [r for r in rows if r["num_envs"] == args.steps_envs]
    for ax, sel, key, label in (
        (axes[0], by_n, "num_envs", f"envs N (T = {steps[0]})"),
        (axes[1], by_t, "num_steps", f"steps T (N = {args.steps_envs})"),
    ):
        sel = sorted(sel, key=lambda r: r[key])
        ax.plot([r[key] for r in sel], [r["env_samples_per_s"] for r in sel], "o-", label="vector env rollout")
        ax.plot([r[key] for r in sel], [r["epoch_samples_per_s"] for r in sel], "s-", label="DDPO-IS epoch")
        ax.set_xlabel(label)
        ax.set_ylabel("samples/s")
        ax.set_xscale("log" if key == "num_envs" else "linear")
        ax.legend()
    fig.suptitle("tiny-shapes on 2 shared CPU cores")
    fig.savefig(args.out / "scaling.png", dpi=100)
    print((args.out / "scaling.md").read_text())


if __name__ == "__main__":
    main()
