"""Two CPU processes (gloo, launched by ``accelerate launch``) = one process with the same global batch.

``accelerate launch --cpu`` starts several processes only through MPI; ``--multi_gpu`` uses torchrun, and on a
machine without GPUs accelerate joins the processes in a gloo group on the CPU (``MULTI_CPU``); the agents'
``Accelerator`` (``diffusion_mdp.agents.distributed``) wraps the model in DDP there, as on GPUs.

The file is also the worker: ``python tests/test_real_scale_distributed.py <pipeline> <out>`` trains one epoch
and saves every rank's trainable weights, so the launched processes run exactly the code a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CONFIG = dict(
    name="dist",
    reward="jpeg_compressibility",
    num_steps=2,
    num_epochs=1,
    samples_per_epoch=4,
    sample_batch_size=2,  # 2 sample batches: one per process
    train_batch_size=2,  # each minibatch is split 1 + 1
    gradient_accumulation_steps=2,  # one optimizer step over both minibatches
    advantage_mode="per_prompt",
    stat_min_count=1,
    learning_rate=1e-2,
    # Adam's first step is lr · g / (|g| + ε): with the default ε = 1e-8 an element whose gradient is ~1e-9
    # flips between ±lr on summation-order noise. A larger ε makes the step a smooth function of g, so the
    # comparison tests the gradients, not Adam's sign function.
    adam_epsilon=1e-3,
    clip_range=0.2,
    eval_num_samples=0,
    image_every=0,
    progress_bar=False,
    log_formats="csv",
    num_threads=1,
)


def worker(pipeline: str, out: str, overrides: dict | None = None) -> None:
    from diffusion_mdp.agents import TrainConfig, train

    prompts = Path(out) / "prompts.txt"
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        prompts.write_text("a red circle\ntwo blue squares\nthree green triangles\n")
    values = {**CONFIG, **(overrides or {}), "model": pipeline, "output_dir": out, "prompts": str(prompts)}
    cfg = TrainConfig.from_dict(values)
    if rank != 0:  # wait for rank 0's prompt file (config validation reads it)
        import time

        for _ in range(600):
            if prompts.is_file():
                break
            time.sleep(0.05)
    agent, _ = train(cfg)
    weights = {n: p.detach().clone() for n, p in agent.unet.named_parameters() if p.requires_grad}
    accelerator = agent.dist.accelerator
    how = {
        "world_size": agent.dist.world_size,
        "strategy": agent.dist.strategy,
        "distributed_type": str(accelerator.state.distributed_type) if accelerator else "",
        "backend": str(accelerator.state.backend) if accelerator else "",
        "prepared": type(getattr(agent.policy.unet, "prepared", agent.policy.unet)).__name__,
    }
    torch.save({"weights": weights, **how}, Path(out) / f"rank{rank}.pt")
    extra = {
        "reward_mean": agent.history[-1]["reward_mean"],
        "prompts": agent.buffer.prompts,
        "group_ids": agent.buffer.group_ids.tolist(),
        "advantages": agent.buffer.advantages.clone(),
        "history": agent.history,
    }
    torch.save(extra, Path(out) / f"rank{rank}-extra.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Flow-GRPO on the bundled flow-matching world: SD3's transformer under DDP, group advantages, the KL reference
# (a no-gradient forward with the adapter disabled), the SDE window.
FLOW = dict(
    algorithm="flow_grpo",
    advantage_mode="group",
    group_size=2,
    kl_coef=0.1,
    clip_range=0.2,
    num_steps=3,
    sde_window_size=2,
)


@pytest.mark.skipif(
    shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
    reason="accelerate CLI not installed",
)
@pytest.mark.parametrize("setup", ["ddpo-is", "flow-grpo"])
def test_two_processes_equal_one(setup: str, reference_pipeline: Path, tmp_path: Path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    this = str(Path(__file__).resolve())
    model, base = (str(reference_pipeline), {}) if setup == "ddpo-is" else ("tiny-shapes-flow", FLOW)

    def run_single(name: str, overrides: dict) -> None:  # in this process (no launcher: world size 1)
        threads = torch.get_num_threads()
        try:
            worker(model, str(tmp_path / name), {**base, **overrides})
        finally:
            torch.set_num_threads(threads)

    # The same global batch: 4 trajectories per optimizer step, in minibatches of 2 (one process) ...
    run_single("one", {})
    # ... and with one trajectory per forward pass, which is what each of the two processes computes.
    run_single("one-b1", {"train_batch_size": 1, "gradient_accumulation_steps": 4})
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    launch = [
        accelerate,
        "launch",
        "--multi_gpu",  # torchrun under the hood; on CPU our processes join with gloo (--cpu would need MPI)
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        this,
        model,
        str(tmp_path / "two"),
        json.dumps(base),
    ]
    double = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stdout[-2000:] + double.stderr[-3000:]

    one, one_b1 = (torch.load(tmp_path / name / "rank0.pt") for name in ("one", "one-b1"))
    two = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1)]
    assert one["world_size"] == 1 and two[0]["world_size"] == two[1]["world_size"] == 2
    assert one["strategy"] == "single" and one["prepared"] != "DistributedDataParallel"
    for rank in two:  # accelerate's CPU multi-process mode, its gloo group, and its DDP wrapper did the work
        assert (rank["strategy"], rank["distributed_type"]) == ("ddp", "DistributedType.MULTI_CPU")
        assert rank["backend"] == "gloo"
        assert rank["prepared"] == "DistributedDataParallel"
    moved = [n for n in one["weights"] if "lora_B" in n and one["weights"][n].abs().max() > 1e-3]
    assert moved  # the update moved lora_B (initialised at 0) by ~lr
    for name, value in one["weights"].items():
        assert torch.equal(two[0]["weights"][name], two[1]["weights"][name])  # the ranks stay in sync
        # Same per-forward batches: equal up to summation order (float32 rounding).
        torch.testing.assert_close(two[0]["weights"][name], one_b1["weights"][name], atol=1e-6, rtol=1e-5)
        # Batched forwards round differently (~1e-7 relative per op), and the PPO gradient is a sum of terms
        # with advantages of both signs that largely cancel, so the one-process/two-process gradients differ
        # by ~1e-4 relative; after one Adam step of lr = 1e-2 that is below 1e-4 absolute.
        torch.testing.assert_close(two[0]["weights"][name], value, atol=1e-4, rtol=1e-3)
    # Rewards and prompts were gathered: every rank saw the global batch, as the single process did.
    extras = [torch.load(tmp_path / name / "rank0-extra.pt") for name in ("one", "two")]
    extras.append(torch.load(tmp_path / "two" / "rank1-extra.pt"))
    assert extras[0]["prompts"] == extras[1]["prompts"] == extras[2]["prompts"]
    assert extras[0]["reward_mean"] == pytest.approx(extras[1]["reward_mean"], abs=1e-9)
    assert extras[1]["reward_mean"] == extras[2]["reward_mean"]
    # The advantages were computed from the gathered global batch: the same on both ranks and as one process.
    assert extras[0]["group_ids"] == extras[1]["group_ids"] == extras[2]["group_ids"]
    assert torch.equal(extras[1]["advantages"], extras[2]["advantages"])
    torch.testing.assert_close(extras[1]["advantages"], extras[0]["advantages"], atol=1e-5, rtol=1e-5)
    # History: sampling statistics are global (equal), training metrics the mean over processes (equal to the
    # one-process run with the same per-forward batches up to summation order).
    one_b1_extra = torch.load(tmp_path / "one-b1" / "rank0-extra.pt")
    for got, want in zip(extras[1]["history"], one_b1_extra["history"], strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # Only the main process wrote the checkpoint and logs.
    assert (tmp_path / "two" / "dist" / "checkpoints" / "last.pt").is_file()


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else None)
