"""Train the bundled tiny-shapes text-to-image model and export it as a Stable Diffusion pipeline folder.

Three stages, each resumable from its own checkpoint under ``--workdir`` (default ``runs/tiny-shapes``):

1. ``vae``: a tiny ``AutoencoderKL`` (32×32 RGB ↔ 4×16×16 latents) on procedural images, reconstruction
   loss plus a very small KL term (as in SD, the latent space must stay smooth but near-deterministic).
   ``scaling_factor`` is then set to 1 / std of the training latents, so the UNet sees unit-variance data.
2. ``unet``: a ``UNet2DConditionModel`` on the latents, ε-prediction with min-SNR-5 loss weighting (faster
   convergence for small budgets), jointly trained with a 2-layer ``CLIPTextModel``; 10% of captions are
   replaced by ``""`` so classifier-free guidance works; bf16 autocast; EMA of the weights.
3. ``export``: writes ``StableDiffusionPipeline.save_pretrained`` (EMA weights; UNet and VAE as fp16
   safetensors to stay under the package size budget, which diffusers loads back as fp32; the text encoder
   in fp32 because transformers would keep fp16) plus the loss curve.

Example (the bundled model)::

    python -m diffusion_mdp.shapes.train_model --stage all --seed 0 --unet-steps 2400 --batch 64

Interrupt at any time; running the same command again resumes where the last checkpoint left off.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from diffusion_mdp.shapes.dataset import IMAGE_SIZE, TRAIN_COMBOS, VOCABULARY, make_dataset
from diffusion_mdp.tokenizer import build_word_tokenizer

MAX_TOKENS = 8  # BOS + at most 3 words + EOS, padded


def vae_config() -> dict[str, Any]:
    """Config of the tiny ``AutoencoderKL``: one downsampling (32×32×3 → 16×16×4)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 16,
        "sample_size": IMAGE_SIZE,
    }


def unet_config() -> dict[str, Any]:
    """Config of the UNet on 4×16×16 latents.

    Cross-attention only at 4×4 (and the mid block) because attention at 8×8 doubled the sampling time on
    2 CPU cores; ``addition_embed_type="text"`` adds an attention-pooled text embedding to the time
    embedding, so every ResNet block is conditioned on the prompt (colour and count are global). Channels
    32/64/128 (4.0M parameters) rather than 64/128/128 (5.7M): the 2 cores were shared with other jobs
    while the bundled model trained, and a ~3× cheaper step bought more optimisation steps.
    """
    return {
        "sample_size": IMAGE_SIZE // 2,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64, 128],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "cross_attention_dim": 128,
        "attention_head_dim": 32,
        "norm_num_groups": 16,
        "addition_embed_type": "text",
    }


def text_config(vocab_size: int) -> dict[str, Any]:
    """Config of the 2-layer CLIP text encoder (ids follow :func:`build_word_tokenizer`: BOS 0, EOS/pad 1)."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_TOKENS,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
        "projection_dim": 128,
    }


def scheduler_config() -> dict[str, Any]:
    """SD's DDIM schedule (scaled-linear betas 0.00085–0.012, 1000 steps, ``set_alpha_to_one=False``)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _load_or_make_data(workdir: Path, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    path = workdir / f"data_{n}_{seed}.npz"
    if path.exists():
        data = np.load(path)
        return data["images"], [str(c) for c in data["captions"]]
    images, specs = make_dataset(n, seed=seed, combos=TRAIN_COMBOS)
    captions = [s.caption for s in specs]
    np.savez(path, images=images, captions=np.array(captions))
    return images, captions


def _save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)  # atomic, so an interrupted save never corrupts the checkpoint


def train_vae(args: argparse.Namespace, images: np.ndarray) -> None:
    """Stage 1 (see module docstring)."""
    from diffusers import AutoencoderKL

    ckpt_path = args.workdir / "vae.pt"
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    step, losses = 0, []
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        vae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        step, losses = ckpt["step"], ckpt["losses"]
    rng = np.random.default_rng(args.seed + step)
    bar = tqdm(total=args.vae_steps, initial=step, desc="vae")
    vae.train()
    stop = min(args.vae_steps, args.vae_stop or args.vae_steps)
    while step < stop:
        lr = args.vae_lr * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x = _images_to_tensor(images[rng.integers(len(images), size=args.vae_batch)])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample.float()
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(float(rec))
        bar.update(1)
        bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.2f}")
        if step % 200 == 0 or step == stop:
            _save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "losses": losses}, ckpt_path)
    bar.close()


@torch.no_grad()
def encode_latents(args: argparse.Namespace, images: np.ndarray) -> tuple[torch.Tensor, float]:
    """Posterior means of all training images (cached) and the scaling factor 1 / std."""
    from diffusers import AutoencoderKL

    path = args.workdir / "latents.pt"
    if path.exists():
        cached = torch.load(path, weights_only=False)
        return cached["latents"], cached["scaling_factor"]
    vae = AutoencoderKL(**vae_config())
    vae.load_state_dict(torch.load(args.workdir / "vae.pt", weights_only=False)["model"])
    vae.eval()
    chunks = []
    for i in tqdm(range(0, len(images), 512), desc="encode"):
        chunks.append(vae.encode(_images_to_tensor(images[i : i + 512])).latent_dist.mean)
    latents = torch.cat(chunks)
    scaling_factor = float(1.0 / latents.std())
    torch.save({"latents": latents, "scaling_factor": scaling_factor}, path)
    return latents, scaling_factor


def build_text_side(workdir: Path):
    """The word tokenizer (written to ``workdir/tokenizer``) and a fresh text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_word_tokenizer(VOCABULARY, workdir / "tokenizer", model_max_length=MAX_TOKENS)
    return tokenizer, CLIPTextModel(CLIPTextConfig(**text_config(len(tokenizer))))


def _ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    for name, param in model.state_dict().items():
        if param.dtype.is_floating_point:
            ema[name].mul_(decay).add_(param.detach(), alpha=1 - decay)
        else:
            ema[name].copy_(param)


def train_unet(args: argparse.Namespace, captions: list[str], latents: torch.Tensor, scale: float) -> None:
    """Stage 2 (see module docstring)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    ckpt_path = args.workdir / "unet.pt"
    torch.manual_seed(args.seed)
    tokenizer, text_encoder = build_text_side(args.workdir)
    unet = UNet2DConditionModel(**unet_config())
    scheduler = DDIMScheduler(**scheduler_config())
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    step, log, elapsed = 0, [], 0.0
    ema = {"unet": {k: v.detach().clone() for k, v in unet.state_dict().items()},
           "text": {k: v.detach().clone() for k, v in text_encoder.state_dict().items()}}
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        unet.load_state_dict(ckpt["unet"])
        text_encoder.load_state_dict(ckpt["text"])
        opt.load_state_dict(ckpt["opt"])
        ema, step, log, elapsed = ckpt["ema"], ckpt["step"], ckpt["log"], ckpt["elapsed"]
        torch.set_rng_state(ckpt["torch_rng"])
    rng = np.random.default_rng([args.seed, step])

    # Tokenize each distinct caption once; index 0 is the empty prompt used for caption dropout.
    vocab = ["", *sorted(set(captions))]
    ids = tokenizer(vocab, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    caption_index = torch.tensor([vocab.index(c) for c in captions])
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight_by_t = torch.clamp(snr, max=args.min_snr) / snr  # min-SNR-γ weighting for ε-prediction

    unet.train()
    text_encoder.train()
    bar = tqdm(total=args.unet_steps, initial=step, desc="unet")
    start, last_save = time.time() - elapsed, time.time()
    # The 2 cores are shared with other jobs; two OpenMP threads slow down ~5x when other processes hold
    # the cores, so every 40 steps we try the other thread count for 5 steps and keep the faster one.
    threads, recent, probe = 1, {}, []
    while step < args.unet_steps:
        phase = step % 40
        if args.threads > 1:
            use = (1 if threads > 1 else args.threads) if phase < 5 else threads
            torch.set_num_threads(use)
            if phase == 5 and probe and recent.get(threads):
                if np.median(probe) < 0.9 * np.median(recent[threads]):
                    threads = 1 if threads > 1 else args.threads
                probe = []
        tic = time.perf_counter()
        warm = min(1.0, (step + 1) / args.warmup)
        lr = args.unet_lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.unet_steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.from_numpy(rng.integers(len(latents), size=args.batch))
        x0 = latents[idx] * scale
        cap = caption_index[idx].clone()
        cap[torch.from_numpy(rng.random(args.batch) < args.cond_dropout)] = 0
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,))
        xt = scheduler.add_noise(x0, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            cond = text_encoder(ids[cap])[0]
            pred = unet(xt, t, cond).sample.float()
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * weight_by_t[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        _ema_update(ema["unet"], unet, decay)
        _ema_update(ema["text"], text_encoder, decay)
        log.append((step, time.time() - start, loss.item(), per_sample.mean().item()))
        took = time.perf_counter() - tic
        if phase < 5 and args.threads > 1:
            probe.append(took)
        elif phase >= 30:
            recent[threads] = [*recent.get(threads, [])[-9:], took]
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}", threads=torch.get_num_threads())
        if step % 50 == 0:
            tqdm.write(f"step {step} t={time.time() - start:.0f}s loss={np.mean([r[2] for r in log[-50:]]):.4f} "
                       f"threads={threads}")
        if time.time() - last_save > args.save_every_s or step == args.unet_steps:
            _save({"unet": unet.state_dict(), "text": text_encoder.state_dict(), "opt": opt.state_dict(),
                   "ema": ema, "step": step, "log": log, "elapsed": time.time() - start,
                   "torch_rng": torch.get_rng_state(), "scaling_factor": scale}, ckpt_path)
            last_save = time.time()
        if args.max_minutes and time.time() - start > args.max_minutes * 60:
            tqdm.write(f"stopping at step {step}: --max-minutes {args.max_minutes} reached")
            _save({"unet": unet.state_dict(), "text": text_encoder.state_dict(), "opt": opt.state_dict(),
                   "ema": ema, "step": step, "log": log, "elapsed": time.time() - start,
                   "torch_rng": torch.get_rng_state(), "scaling_factor": scale}, ckpt_path)
            break
    bar.close()


def export(args: argparse.Namespace, scale: float, use_ema: bool = True) -> Path:
    """Stage 3: write the pipeline folder (fp16 safetensors) and the loss curve to ``--export``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer, text_encoder = build_text_side(args.workdir)
    unet = UNet2DConditionModel(**unet_config())
    ckpt = torch.load(args.workdir / "unet.pt", weights_only=False)
    unet.load_state_dict(ckpt["ema"]["unet"] if use_ema else ckpt["unet"])
    text_encoder.load_state_dict(ckpt["ema"]["text"] if use_ema else ckpt["text"])
    vae = AutoencoderKL(**vae_config(), scaling_factor=scale)
    vae.load_state_dict(torch.load(args.workdir / "vae.pt", weights_only=False)["model"])
    pipe = StableDiffusionPipeline(
        # transformers loads a model in the dtype it was saved in ("auto"), diffusers in fp32: keep the
        # small text encoder in fp32 so every component comes back as fp32.
        vae=vae.half(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.half(),
        scheduler=DDIMScheduler(**scheduler_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(args.export)
    pipe.save_pretrained(out, safe_serialization=True)

    log = np.array(ckpt["log"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    window = max(1, min(50, len(log) // 2))
    smooth = np.convolve(log[:, 3], np.ones(window) / window, mode="valid")
    ax.plot(log[:, 0], log[:, 3], alpha=0.25, lw=0.5, label="unweighted ε-MSE per step")
    ax.plot(log[window - 1 :, 0], smooth, lw=1.5, label=f"moving average ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(f"tiny-shapes UNet training ({log[-1, 1] / 60:.1f} min, {int(log[-1, 0])} steps)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=100)
    summary = {"steps": int(log[-1, 0]), "wall_minutes": float(log[-1, 1] / 60),
               "final_loss_ma": float(smooth[-1]), "scaling_factor": scale, "seed": args.seed, "ema": use_ema}
    (args.workdir / "export_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["vae", "unet", "export", "all"], default="all")
    p.add_argument("--workdir", type=Path, default=Path("runs/tiny-shapes"))
    p.add_argument("--export", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "tiny-shapes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-train", type=int, default=60000, help="procedural training images (train combos)")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--vae-stop", type=int, default=400,
                   help="stop the VAE here (the LR schedule still spans --vae-steps; 0: run to the end)")
    p.add_argument("--vae-batch", type=int, default=64)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4, help="KL weight (per latent element)")
    p.add_argument("--unet-steps", type=int, default=2400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument("--cond-dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop the UNet stage early (0: never)")
    p.add_argument("--save-every-s", type=float, default=120.0)
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    images, captions = _load_or_make_data(args.workdir, args.n_train, args.seed)
    if args.stage in ("vae", "all"):
        train_vae(args, images)
    if args.stage in ("unet", "export", "all"):
        latents, scale = encode_latents(args, images)
        if args.stage in ("unet", "all"):
            train_unet(args, captions, latents, scale)
        if args.stage in ("export", "all"):
            export(args, scale)


if __name__ == "__main__":
    main()
