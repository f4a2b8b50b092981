"""``diffusion-mdp``: the command line (``train`` and ``sample``).

    diffusion-mdp train --preset tiny-shapes                      # the main job, runs/tiny-shapes/
    diffusion-mdp train --config run.toml --num-epochs 50         # file, then flags on top
    diffusion-mdp train --name tiny-shapes --resume               # continue a run from its checkpoint
    diffusion-mdp sample --run runs/tiny-shapes --prompt "two red circles" --num-samples 8

Every field of :class:`diffusion_mdp.agents.TrainConfig` is a flag (``--learning-rate``; booleans have
``--no-`` forms). Bad flags and configs fail before any model is loaded, with a message naming the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from diffusion_mdp.agents.config import TrainConfig, field_docs

    docs = field_docs()
    group = parser.add_argument_group("config fields (override the preset and the config file)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str, "bool": bool}[
            f.type if isinstance(f.type, str) else f.type.__name__
        ]
        help_text = f"{docs.get(f.name, '')} (default: {f.default})".replace("%", "%%")
        if kind is bool:
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        else:
            group.add_argument(
                flag, dest=f.name, type=kind, default=argparse.SUPPRESS, metavar=kind.__name__.upper(), help=help_text
            )


def build_parser() -> argparse.ArgumentParser:
    from diffusion_mdp.agents.presets import PRESETS

    # allow_abbrev=False everywhere: a prefix of a flag (--learning-rat, --resum) is an error, not that flag.
    parser = argparse.ArgumentParser(prog="diffusion-mdp", description="DDPO on the denoising MDP.", allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train a diffusion model with DDPO or RWR",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    train.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset (the paper's tasks, tiny-shapes)")
    train.add_argument(
        "--config", dest="config_file", help="TOML or JSON file of config fields (flat, or a [train] table)"
    )
    train.add_argument("--resume", action="store_true", help="continue the run <output-dir>/<name> from its checkpoint")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a run folder that holds a previous run (deletes that run's files, nothing else)",
    )
    _add_config_flags(train)

    sample = commands.add_parser("sample", help="render images from a run's checkpoint", allow_abbrev=False)
    source = sample.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run folder (uses its newest intact checkpoint)")
    source.add_argument("--checkpoint", help="checkpoint file")
    sample.add_argument("--prompt", action="append", dest="prompts", help="prompt (repeatable); default: eval prompts")
    sample.add_argument("--num-samples", type=int, default=8, help="images to render")
    sample.add_argument("--seed", type=int, default=0, help="noise seed")
    sample.add_argument("--num-steps", type=int, default=None, help="denoising steps (default: the run's)")
    sample.add_argument("--out", default=None, help="output PNG (default: <run>/images/sample_seed<seed>.png)")
    sample.add_argument(
        "--base",
        action="store_true",
        help="render the base model (LoRA disabled, or the untrained UNet of a full fine-tune)",
    )
    return parser


def _fail(message: str) -> int:
    print(f"diffusion-mdp: error: {message}", file=sys.stderr)
    return 2


def cmd_train(args: argparse.Namespace) -> int:
    from diffusion_mdp.agents.checkpointing import checkpoint_path
    from diffusion_mdp.agents.config import ConfigError, TrainConfig, build_config
    from diffusion_mdp.agents.train import resume_config, train

    reserved = {"command", "preset", "config_file", "resume", "overwrite"}
    overrides = {k: v for k, v in vars(args).items() if k not in reserved}
    try:
        if args.resume:
            if args.preset or args.config_file:
                raise ConfigError("--resume reads the run's own config from its checkpoint: drop --preset/--config")
            base = TrainConfig.from_dict({k: v for k, v in overrides.items() if k in ("name", "output_dir")})
            config = resume_config(base.run_dir, overrides).validate()
        else:
            config = build_config(args.preset, args.config_file, **overrides)
        print(f"run folder: {config.run_dir}  (algorithm {config.algorithm}, reward {config.reward})")
        _, summary = train(config, resume=args.resume, overwrite=args.overwrite)
    except ConfigError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt as exc:
        saved = checkpoint_path(config.run_dir).is_file()
        print(f"interrupted: {str(exc) or 'aborted; the unfinished epoch was not saved'}", file=sys.stderr)
        if saved:
            print(
                f"continue with: diffusion-mdp train --name {config.name} --output-dir {config.output_dir} --resume",
                file=sys.stderr,
            )
        return 128 + int(getattr(exc, "signum", 2))  # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP
    if "rank" in summary:  # a non-main process of accelerate launch: the main one reports
        return 0
    if "eval_before" in summary:
        print(
            f"held-out reward: {summary['eval_before']:.4f} (epoch {summary['eval_before_epoch']}) -> "
            f"{summary['eval_after']:.4f} (epoch {summary['eval_after_epoch']})"
        )
    print(f"outputs in {summary['run_dir']}: reward_curve.png, images/before.png, images/after.png, summary.json")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from diffusion_mdp.agents.base import CheckpointError, find_checkpoint, load_checkpoint_file, run_deterministic
    from diffusion_mdp.agents.config import ConfigError, TrainConfig
    from diffusion_mdp.agents.train import make_agent
    from diffusion_mdp.agents.visual import save_grid
    from diffusion_mdp.prompts import PromptSet

    if args.num_samples < 1:
        return _fail(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.num_steps is not None and args.num_steps < 1:
        return _fail(f"--num-steps must be >= 1 (or left out for the run's own), got {args.num_steps}")
    if args.seed < 0:
        return _fail(f"--seed must be >= 0, got {args.seed}")
    if args.prompts and not all(p.strip() for p in args.prompts):
        return _fail("--prompt '' is empty: give a prompt, or leave --prompt out for the run's eval prompts")
    try:
        if args.checkpoint:
            path = Path(args.checkpoint)
            state = load_checkpoint_file(path)  # weights_only: opening a file cannot execute code
        else:
            found = find_checkpoint(Path(args.run))  # the newest intact one (a damaged newest one is skipped)
            if found is None:
                return _fail(f"no checkpoint in {Path(args.run) / 'checkpoints'}: pass --run <folder> or --checkpoint")
            path, state = found
        where = {"output_dir": str(Path(args.run).parent), "name": Path(args.run).name} if args.run else {}
        config = TrainConfig.from_dict({**state["config"], "progress_bar": False, "device": "cpu", **where})
        agent = make_agent(config)
    except (CheckpointError, ConfigError, FileNotFoundError) as exc:
        return _fail(str(exc))
    if args.base and not config.use_lora:
        # A full fine-tune changed the UNet itself: its base is the model as loaded, before the checkpoint.
        print(f"--base: rendering {config.model} as loaded (the checkpoint's fine-tuned UNet is not applied)")
    else:
        agent.load_state_dict(state)
    prompts = args.prompts or agent.eval_prompts.prompts
    prompts = [prompts[i % len(prompts)] for i in range(args.num_samples)]
    noise = torch.randn(
        (len(prompts), *agent.components.latent_shape), generator=torch.Generator().manual_seed(args.seed)
    )
    if args.base and config.use_lora:
        agent.unet.disable_adapters()
    # The samples run through an η = 0 env of these prompts (the eval prompts' metadata where they match),
    # scored by the env's reward like the held-out evaluation.
    unique = list(dict.fromkeys(prompts))
    index = {p: i for i, p in enumerate(agent.eval_prompts.prompts)}
    metadata = [agent.eval_prompts.metadata[index[p]] if p in index else {} for p in unique]
    env = agent.evaluation_env(PromptSet(unique, metadata), len(prompts), args.num_steps or config.num_steps)
    images, rewards, _ = run_deterministic(env, agent.policy, noise, [unique.index(p) for p in prompts], agent.autocast)
    out = Path(args.out) if args.out else agent.run_dir / "images" / f"sample_seed{args.seed}.png"
    save_grid(
        images,
        [f"{p} | r={r:.3g}" for p, r in zip(prompts, rewards, strict=True)],
        out,
        title=f"{path} epoch {state['epoch']}{' (base)' if args.base else ''}, η=0, seed {args.seed}",
    )
    print(f"wrote {out}: mean {config.reward} {rewards.mean():.4f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers: dict[str, Any] = {"train": cmd_train, "sample": cmd_sample}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
