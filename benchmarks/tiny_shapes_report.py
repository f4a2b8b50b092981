"""Quality and speed report of the bundled models (tiny-shapes, tiny-shapes-flow): do they draw the prompt?

For each prompt set, samples ``--per-prompt`` images per prompt with 20 DDIM steps (η = 1) and
classifier-free guidance, and reports the fraction whose colour, shape and count the bundled captioner
finds correct (and all three at once). Also times one 20-step sampling of 32 images with CFG (bf16 autocast
and fp32), and the same through ``StableDiffusionPipeline.__call__``. Writes ``report.md`` and
``grid.png`` into ``--out`` (default ``docs/tiny_shapes``).

Sampling is a plain loop over ``DDIMScheduler`` (the project's env/policy is separate), with the same
components ``StableDiffusionPipeline.from_pretrained`` loads. A ``StableDiffusion3Pipeline`` folder (the
flow-matching tiny-shapes-flow, detected from ``model_index.json``) is sampled instead with 20 Euler steps
of the flow ODE (``diffusion_mdp.shapes.train_flow_model.sample``, what the pipeline's call does), once per
``--max-sequence-length`` (the zero "T5" tokens that pipeline appends; the first value is the headline).

    PYTHONPATH=. .venv/bin/python benchmarks/tiny_shapes_report.py            # ~2 min on 2 cores
    PYTHONPATH=. .venv/bin/python benchmarks/tiny_shapes_report.py --cfg 5 3 7 --per-prompt 8
    PYTHONPATH=. .venv/bin/python benchmarks/tiny_shapes_report.py --model tiny-shapes-flow \
        --out docs/tiny_shapes_flow --max-sequence-length 256 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def is_flow(path: str | Path) -> bool:
    """Whether the folder holds a flow-matching ``StableDiffusion3Pipeline``."""
    return json.loads((Path(path) / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"


def load_pipeline(path: str | Path):
    """The pipeline (SD or SD3, from ``model_index.json``), offline, without progress bars."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    cls = StableDiffusion3Pipeline if is_flow(path) else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(
    pipe,
    prompts: list[str],
    steps: int = 20,
    eta: float = 1.0,
    guidance: float = 4.0,
    seed: int = 0,
    bf16: bool = True,
    max_sequence_length: int = 256,
) -> np.ndarray:
    """DDIM sampling with CFG (Euler on the flow ODE for SD3); returns uint8 images ``(len(prompts), H, W, 3)``."""
    from diffusers import DDIMScheduler

    if hasattr(pipe, "transformer"):
        from diffusion_mdp.shapes.train_flow_model import sample as flow_sample

        return flow_sample(pipe, prompts, steps=steps, guidance=guidance, seed=seed, bf16=bf16,
                           max_sequence_length=max_sequence_length)

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    tok = pipe.tokenizer
    ids = tok(list(prompts) + [""] * len(prompts), padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids
    unet, vae = pipe.unet, pipe.vae
    shape = (len(prompts), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents = torch.randn(shape, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        cond = pipe.text_encoder(ids)[0]
        for t in scheduler.timesteps:
            eps = unet(torch.cat([latents, latents]), t, cond).sample.float()
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents, eta=eta, generator=gen).prev_sample
        images = vae.decode(latents / vae.config.scaling_factor).sample.float()
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def time_sampling(pipe, n: int = 32, repeats: int = 3, bf16: bool = True, max_sequence_length: int = 256) -> float:
    """Median seconds of one 20-step CFG sampling of ``n`` images (after one warm-up run)."""
    prompts = ["two red circles"] * n
    sample(pipe, prompts[:4], bf16=bf16, max_sequence_length=max_sequence_length)
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        sample(pipe, prompts, seed=r, bf16=bf16, max_sequence_length=max_sequence_length)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_pipeline_call(pipe, n: int = 32, repeats: int = 3, **kwargs) -> float:
    """Median seconds of ``pipe(prompt, num_inference_steps=20, eta=1)`` for ``n`` images (fp32).

    ``kwargs`` go to the call (SD3: ``max_sequence_length``; its Euler scheduler takes no ``eta``).
    """
    kwargs = kwargs if hasattr(pipe, "transformer") else {"eta": 1.0, **kwargs}
    pipe(["a red circle"] * 4, num_inference_steps=20, guidance_scale=4.0, output_type="np", **kwargs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe(["a red circle"] * n, num_inference_steps=20, guidance_scale=4.0, output_type="np", **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def evaluate(pipe, captioner, prompt_set, per_prompt: int, guidance: float, seed: int,
             batch: int = 64, max_sequence_length: int = 256) -> tuple[dict[str, float], np.ndarray, list[str]]:
    """Captioner-judged accuracy of the samples of one prompt set."""
    prompts = [p for p in prompt_set.prompts for _ in range(per_prompt)]
    metas = [m for m in prompt_set.metadata for _ in range(per_prompt)]
    images = np.concatenate([sample(pipe, prompts[i : i + batch], guidance=guidance, seed=seed + i,
                                    max_sequence_length=max_sequence_length)
                             for i in range(0, len(prompts), batch)])
    found = captioner.attributes(images)
    correct = {k: np.array([f[k] == m[k] for f, m in zip(found, metas, strict=True)]) for k in
               ("colour", "shape", "count")}
    result = {k: float(v.mean()) for k, v in correct.items()}
    result["all"] = float(np.logical_and.reduce(list(correct.values())).mean())
    return result, images, prompts


def make_grid(images: np.ndarray, labels: list[str], cols: int, scale: int = 2) -> Image.Image:
    """Rows of ``cols`` images, each row labelled with its prompt."""
    h, w = images.shape[1:3]
    rows = len(images) // cols
    label_w = 150
    grid = Image.new("RGB", (label_w + cols * w * scale, rows * h * scale), "white")
    draw = ImageDraw.Draw(grid)
    for r in range(rows):
        draw.text((4, r * h * scale + h * scale // 2 - 6), labels[r * cols], fill="black")
        for c in range(cols):
            tile = Image.fromarray(images[r * cols + c]).resize((w * scale, h * scale), Image.Resampling.NEAREST)
            grid.paste(tile, (label_w + c * w * scale, r * h * scale))
    return grid


def main() -> None:
    """Command-line entry point (see the module docstring)."""
    from diffusion_mdp.prompts import load_prompts
    from diffusion_mdp.shapes import flow_model_path, model_path
    from diffusion_mdp.shapes.captioner import Captioner

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(model_path()),
                   help="pipeline folder, or tiny-shapes / tiny-shapes-flow for the bundled ones")
    p.add_argument("--out", type=Path, default=Path("docs/tiny_shapes"))
    p.add_argument("--cfg", type=float, nargs="+", default=[5.0, 3.0, 7.0],
                   help="guidance scales; the first is used for every set and the grid, the rest on shapes_train")
    p.add_argument("--per-prompt", type=int, default=8)
    p.add_argument("--sets", nargs="+", default=["shapes_train", "shapes_heldout", "shapes_counting"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--max-sequence-length", type=int, nargs="+", default=[256],
                   help="SD3 only: zero text tokens appended (pipeline default 256); the rest on shapes_train")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.model = {"tiny-shapes": str(model_path()), "tiny-shapes-flow": str(flow_model_path())}.get(args.model,
                                                                                                  args.model)
    flow = is_flow(args.model)
    lengths = args.max_sequence_length if flow else [256]

    pipe = load_pipeline(args.model)
    captioner = Captioner.load()
    rows, grid_images = [], None
    for length in lengths:
        for guidance in args.cfg:
            # The first CFG scale (and length) is the headline; the others are a sweep on shapes_train only.
            headline = guidance == args.cfg[0] and length == lengths[0]
            for name in args.sets if headline else [n for n in args.sets if n == "shapes_train"]:
                start = time.perf_counter()
                result, images, prompts = evaluate(pipe, captioner, load_prompts(name), args.per_prompt, guidance,
                                                   args.seed, max_sequence_length=length)
                rows.append((name, guidance, length, len(images), result, time.perf_counter() - start))
                print(name, guidance, length, result, flush=True)
                if name == "shapes_train" and headline:
                    grid_images, grid_prompts = images, prompts
    if flow:
        how = ("`StableDiffusion3Pipeline.from_pretrained`. Sampling: 20 Euler steps of the flow ODE "
               f"(shift {pipe.scheduler.config.shift:g}), classifier-free guidance")
        title, call = "tiny-shapes-flow", "StableDiffusion3Pipeline.__call__"
    else:
        how = "`StableDiffusionPipeline.from_pretrained`. Sampling: 20 DDIM steps, η = 1, classifier-free guidance"
        title, call = "tiny-shapes", "StableDiffusionPipeline.__call__"
    lines = [
        f"# {title}: quality and speed report",
        "",
        f"Model: `{Path(args.model).name}` loaded with {how}, bf16 autocast, {args.threads} CPU threads, seed "
        f"{args.seed}, {args.per_prompt} samples per prompt. Judge: the bundled captioner (fraction of samples "
        "whose colour / shape / count it reads as the prompt's). Targets for `shapes_train`: colour ≥ 80%, "
        "shape ≥ 70%.",
        "",
        "| prompt set | CFG | samples | colour | shape | count | all three |",
        "|---|---|---|---|---|---|---|",
    ]
    if flow:
        lines[-2:] = ["| prompt set | CFG | `max_sequence_length` | samples | colour | shape | count | all three |",
                      "|---|---|---|---|---|---|---|---|"]
    for name, guidance, length, n, r, _ in rows:
        length_cell = f" {length} |" if flow else ""
        lines.append(f"| {name} | {guidance:g} |{length_cell} {n} | {r['colour']:.1%} | {r['shape']:.1%} "
                     f"| {r['count']:.1%} | {r['all']:.1%} |")
    if not args.no_timing:
        t_bf16 = time_sampling(pipe, bf16=True, max_sequence_length=lengths[0])
        t_fp32 = time_sampling(pipe, bf16=False, max_sequence_length=lengths[0])
        t_pipe = time_pipeline_call(pipe, **({"max_sequence_length": lengths[0]} if flow else {}))
        net = f"the transformer, `max_sequence_length` {lengths[0]}" if flow else "the UNet"
        lines += [
            "",
            f"## Speed: one 20-step {'Euler' if flow else 'DDIM'} sampling of 32 images with CFG "
            f"(batch 64 through {net})",
            "",
            "| how | seconds (median of 3) |",
            "|---|---|",
            f"| plain loop, bf16 autocast | {t_bf16:.2f} |",
            f"| plain loop, fp32 | {t_fp32:.2f} |",
            f"| `{call}`, fp32 | {t_pipe:.2f} |",
        ]
        if flow and len(lengths) > 1:
            t_short = time_sampling(pipe, bf16=True, max_sequence_length=lengths[-1])
            lines.append(f"| plain loop, bf16 autocast, `max_sequence_length` {lengths[-1]} | {t_short:.2f} |")
        lines += ["", f"Target: ≤ 3 s. Measured on {args.threads} threads of a shared 2-core CPU (AMX-BF16)."]
        print(f"timing bf16 {t_bf16:.2f}s fp32 {t_fp32:.2f}s pipeline {t_pipe:.2f}s")
    if grid_images is not None:
        # First 12 training prompts (one per colour–shape–count), 8 samples each.
        per = args.per_prompt
        keep = np.concatenate([np.arange(i * per, i * per + min(per, 8)) for i in range(0, 60, 5)])
        make_grid(grid_images[keep], [grid_prompts[i] for i in keep], cols=min(per, 8)).save(args.out / "grid.png")
        lines += ["", f"## Samples (CFG {args.cfg[0]:g}; every 5th `shapes_train` prompt)", "",
                  "![samples](grid.png)"]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
