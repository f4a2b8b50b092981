"""DDPO on Stable Diffusion from Python: a paper preset, your overrides, optionally a remote reward.

The command line (``diffusion-mdp train --preset aesthetic``) does the same; this is the programmatic form,
e.g. to plug in your own reward callable. Under ``accelerate launch`` every process runs this script and the
agent splits the work (see docs/real_scale.md):

    python examples/train_stable_diffusion.py --preset aesthetic
    python examples/train_stable_diffusion.py --preset prompt-alignment --reward http://reward-node:8000
    accelerate launch --multi_gpu --num_processes 8 examples/train_stable_diffusion.py --preset aesthetic
    # offline smoke test on a tiny random SD pipeline (CPU, seconds; images are noise):
    python examples/train_stable_diffusion.py --smoke
"""

from __future__ import annotations

import argparse
import tempfile

from diffusion_mdp.agents import PRESETS, build_config, train


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="aesthetic", choices=sorted(PRESETS))
    parser.add_argument("--model", default=None, help="override the preset's model (hub id or folder), e.g. SD 1.5")
    parser.add_argument("--reward", default=None, help="registered reward name or http://host:port")
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--smoke", action="store_true", help="one tiny epoch on a random SD-structured pipeline")
    args = parser.parse_args(argv)

    overrides: dict = {"output_dir": args.output_dir}
    if args.model:
        overrides["model"] = args.model
    if args.reward:
        overrides["reward"] = args.reward
    if args.reward and args.reward.startswith("http"):
        overrides["async_reward"] = True  # score batch b on the server while batch b + 1 samples
    if args.smoke:
        from diffusion_mdp.testing import build_reference_tiny_pipeline

        folder = build_reference_tiny_pipeline(tempfile.mkdtemp())
        overrides.update(
            model=str(folder), device="cpu", mixed_precision="no", num_steps=2, num_epochs=1, samples_per_epoch=4,
            sample_batch_size=2, train_batch_size=2, gradient_accumulation_steps=1, eval_num_samples=2,
            name=f"smoke-{args.preset}", output_dir=tempfile.mkdtemp(), reward=args.reward or "jpeg_compressibility",
            log_formats="csv", num_threads=1,
        )  # fmt: skip
    config = build_config(args.preset, **overrides)
    _, summary = train(config)
    print(summary)
    return summary


if __name__ == "__main__":
    main()
