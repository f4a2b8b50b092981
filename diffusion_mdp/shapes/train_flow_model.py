"""Train the bundled tiny-shapes-flow model: a rectified-flow SD3 transformer for the tiny-shapes world.

Same data (60,000 procedural images of the training colour–shape pairs, :mod:`diffusion_mdp.shapes.dataset`)
and the same VAE as the bundled tiny-shapes model (its weights are reused, not retrained), but the denoiser
is an ``SD3Transformer2DModel`` trained with the flow-matching objective and the whole thing is exported as
a ``StableDiffusion3Pipeline`` folder. Stages, each resumable from its checkpoint under ``--workdir``
(default ``runs/tiny-shapes-flow``):

1. ``latents``: the posterior means of the training images under the bundled tiny-shapes VAE, cached.
2. ``transformer``: the transformer and two tiny ``CLIPTextModelWithProjection`` encoders (the SD3 pipeline
   needs two; there is no T5) trained jointly on the rectified-flow loss (see :func:`flow_matching_loss`),
   σ drawn logit-normally as in SD3, 10% of captions replaced by ``""`` for classifier-free guidance,
   bf16 autocast, EMA of the weights.
3. ``export``: picks the sampling shift on ``shapes_train`` (:func:`choose_shift`), then
   ``StableDiffusion3Pipeline.save_pretrained`` (EMA weights; transformer and VAE as fp16 safetensors, the
   text encoders in fp32 because transformers keeps the saved dtype; a placeholder T5 that outputs zeros,
   :func:`build_null_t5`) and the loss curve.

Notation (code name -> rectified flow, Esser et al. 2024): ``x0`` -> x_0 (clean latent), ``noise`` -> ε,
``sigma`` -> t ∈ [0, 1], ``xt`` -> z_t = (1 - t) x_0 + t ε, ``pred`` -> v_Θ(z_t, t), target ε - x_0. The
pipeline's Euler step ``x + (σ_next - σ) v`` integrates dz/dt = v from t = 1 (noise) to 0 (image).

**The null tokens.** Without a T5 encoder ``StableDiffusion3Pipeline`` appends ``max_sequence_length``
(default 256) all-zero vectors to the CLIP tokens. They enter the transformer identically and stay
identical through every block (the text stream has no positional embedding), so n of them act exactly
like one whose attention logit is raised by log n. Training uses one null token and that logit offset
(:class:`NullTokenAttnProcessor`), with n drawn per sample (0, 256, or log-uniform in 1–512), so the
exported model works with the pipeline's default and with a short ``max_sequence_length`` alike while a
training step costs 9 text tokens instead of 264.

Example (the bundled model)::

    python -m diffusion_mdp.shapes.train_flow_model --stage all --seed 0 --steps 2000 --max-minutes 58

Interrupt at any time; running the same command again resumes where the last checkpoint left off.

Why one file of ~570 lines: it is the training script of one artefact (the bundled tiny-shapes-flow folder),
read top to bottom like its sibling ``train_model.py``: the architecture, the loss, the training loop and the
export are its stages, and none of them is used by anything but this script and its test.
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

from diffusion_mdp.shapes import model_path
from diffusion_mdp.shapes.dataset import VOCABULARY
from diffusion_mdp.shapes.train_model import MAX_TOKENS, _ema_update, _images_to_tensor, _load_or_make_data, _save
from diffusion_mdp.tokenizer import build_word_tokenizer

# The pipeline's default ``max_sequence_length``: how many zero "T5" tokens it appends without a T5.
PIPELINE_NULL_TOKENS = 256


def transformer_config() -> dict[str, Any]:
    """Config of the ``SD3Transformer2DModel`` on 4×16×16 latents.

    Patch size 2 gives 8×8 = 64 image tokens; width 96 (3 heads of 32), 4 joint blocks (1.3M parameters),
    RMS q/k-norm as in SD3.5 (keeps attention logits bounded at a high learning rate). Width 128 with 5
    blocks (2.9M) measured 4.4 s per batch-64 step against 2.2 s on one shared core, too slow for the
    training budget. ``joint_attention_dim`` is the two CLIP widths side by side (64 + 64),
    ``pooled_projection_dim`` their two projections (64 + 64).
    """
    return {
        "sample_size": 16,
        "patch_size": 2,
        "in_channels": 4,
        "out_channels": 4,
        "num_layers": 4,
        "attention_head_dim": 32,
        "num_attention_heads": 3,
        "joint_attention_dim": 128,
        "caption_projection_dim": 96,
        "pooled_projection_dim": 128,
        "pos_embed_max_size": 8,
        "qk_norm": "rms_norm",
    }


def text_config(vocab_size: int) -> dict[str, Any]:
    """Config of each of the two 2-layer CLIP text encoders (ids follow :func:`build_word_tokenizer`)."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": MAX_TOKENS,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
        "projection_dim": 64,
    }


def scheduler_config(shift: float) -> dict[str, Any]:
    """``FlowMatchEulerDiscreteScheduler`` config: 1000 train timesteps, a static ``shift``, no dynamic shift."""
    return {"num_train_timesteps": 1000, "shift": float(shift), "use_dynamic_shifting": False}


@torch.no_grad()
def encode_latents(workdir: Path, images: np.ndarray, vae_path: Path | None = None) -> tuple[torch.Tensor, float]:
    """Posterior means of ``images`` under the bundled tiny-shapes VAE (cached in ``workdir/latents.pt``).

    Args:
        workdir: Cache folder.
        images: uint8 ``(N, 32, 32, 3)``.
        vae_path: VAE folder (default: the bundled tiny-shapes model's ``vae/``).

    Returns:
        Unscaled latents ``(N, 4, 16, 16)`` and the VAE's ``scaling_factor``.
    """
    from diffusers import AutoencoderKL

    path = workdir / "latents.pt"
    if path.exists():
        cached = torch.load(path, weights_only=False)
        return cached["latents"], cached["scaling_factor"]
    vae = AutoencoderKL.from_pretrained(vae_path or model_path() / "vae", local_files_only=True).eval()
    chunks = [vae.encode(_images_to_tensor(images[i : i + 512])).latent_dist.mean
              for i in tqdm(range(0, len(images), 512), desc="encode")]
    latents = torch.cat(chunks)
    scaling_factor = float(vae.config.scaling_factor)
    torch.save({"latents": latents, "scaling_factor": scaling_factor}, path)
    return latents, scaling_factor


class NullTokenAttnProcessor:
    """``JointAttnProcessor2_0`` that can count the last text token n times (training-time shortcut).

    With ``null_log_count=None`` it computes exactly what diffusers' ``JointAttnProcessor2_0`` computes.
    With ``null_log_count`` ``(B,)`` = log n per sample, the last key of the joint sequence (the one null
    token) gets +log n on its attention logit, which is what n identical copies of it would contribute to the
    softmax (-inf removes it: n = 0). Pass it as ``joint_attention_kwargs={"null_log_count": ...}``.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        null_log_count: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        batch, n_image = hidden_states.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, L, H·D) -> (B, H, L, D)
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        mask = None
        if encoder_hidden_states is not None:
            q_txt = heads(attn.add_q_proj(encoder_hidden_states))
            k_txt = heads(attn.add_k_proj(encoder_hidden_states))
            v_txt = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                q_txt, k_txt = attn.norm_added_q(q_txt), attn.norm_added_k(k_txt)
            query, key, value = (torch.cat(pair, dim=2) for pair in ((query, q_txt), (key, k_txt), (value, v_txt)))
            if null_log_count is not None:
                # Additive logit bias (B, 1, 1, L): 0 everywhere except log n on the null token's key.
                mask = query.new_zeros(batch, 1, 1, key.shape[2])
                mask[:, 0, 0, -1] = null_log_count.to(mask.dtype)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        image, text = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return attn.to_out[1](attn.to_out[0](image)), text


def build_models(workdir: Path | None = None, seed: int = 0, config: dict[str, Any] | None = None):
    """The word tokenizer (saved to ``workdir/tokenizer`` if given), two fresh text encoders, the transformer.

    The transformer starts from DiT's adaLN-Zero initialisation: every modulation layer and the output
    projection are zero, so each block starts as the identity and the model as v = 0.

    Args:
        workdir: Where to write the tokenizer (a temporary folder if None).
        seed: Seed of the initial weights.
        config: Transformer config (default :func:`transformer_config`; tests pass a micro one).

    Returns:
        ``(tokenizer, text_encoder, text_encoder_2, transformer)``.
    """
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = build_word_tokenizer(VOCABULARY, None if workdir is None else workdir / "tokenizer",
                                     model_max_length=MAX_TOKENS)
    torch.manual_seed(seed)
    config = config or transformer_config()
    # Each encoder gets half of the transformer's text width and half of its pooled width.
    text_cfg = {**text_config(len(tokenizer)), "hidden_size": config["joint_attention_dim"] // 2,
                "projection_dim": config["pooled_projection_dim"] // 2}
    text_encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)) for _ in range(2)]
    transformer = SD3Transformer2DModel(**config)
    for module in transformer.modules():
        linear = getattr(module, "linear", None)
        if type(module).__name__.startswith("AdaLayerNorm") and isinstance(linear, torch.nn.Linear):
            torch.nn.init.zeros_(linear.weight)
            torch.nn.init.zeros_(linear.bias)
    torch.nn.init.zeros_(transformer.proj_out.weight)
    torch.nn.init.zeros_(transformer.proj_out.bias)
    return tokenizer, text_encoders[0], text_encoders[1], transformer


def build_null_t5(joint_attention_dim: int):
    """A word-level ``T5Tokenizer`` and a 1-layer ``T5EncoderModel`` whose output is exactly zero.

    ``StableDiffusion3Pipeline.from_pretrained(folder)`` needs a ``text_encoder_3`` unless the caller
    passes ``text_encoder_3=None, tokenizer_3=None``. This placeholder's final RMS norm has weight 0, so it
    returns the same all-zero ``(B, max_sequence_length, joint_attention_dim)`` tensor the pipeline
    substitutes when T5 is dropped: the folder loads with a plain ``from_pretrained`` and gives the same
    images either way. It is never trained.

    Returns:
        ``(tokenizer_3, text_encoder_3)``.
    """
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), *(("▁" + w, -1.0) for w in VOCABULARY)]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    config = T5Config(vocab_size=len(tokenizer), d_model=joint_attention_dim, d_kv=16, d_ff=32, num_layers=1,
                      num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    encoder = T5EncoderModel(config).eval()
    with torch.no_grad():
        encoder.encoder.final_layer_norm.weight.zero_()
    return tokenizer, encoder


def encode_text(text_encoder: Any, text_encoder_2: Any, ids: torch.Tensor, joint_attention_dim: int,
                null_tokens: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``StableDiffusion3Pipeline.encode_prompt`` computes without a T5, from token ids.

    Both CLIP encoders read the same ids; their penultimate hidden states are concatenated along the
    width and zero-padded to ``joint_attention_dim``, then ``null_tokens`` zero vectors (the missing T5's
    tokens) are appended. The pooled embedding is the two projected EOS embeddings side by side.

    Args:
        text_encoder: First ``CLIPTextModelWithProjection``.
        text_encoder_2: Second ``CLIPTextModelWithProjection``.
        ids: Token ids ``(B, L)`` padded to the tokenizer's ``model_max_length``.
        joint_attention_dim: The transformer's text width.
        null_tokens: How many zero tokens to append (the pipeline's ``max_sequence_length``).

    Returns:
        ``prompt_embeds`` ``(B, L + null_tokens, joint_attention_dim)`` and ``pooled`` ``(B, P1 + P2)``.
    """
    outs = [enc(ids, output_hidden_states=True) for enc in (text_encoder, text_encoder_2)]
    clip = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
    clip = F.pad(clip, (0, joint_attention_dim - clip.shape[-1]))
    null = clip.new_zeros(clip.shape[0], null_tokens, joint_attention_dim)
    return torch.cat([clip, null], dim=1), torch.cat([o.text_embeds for o in outs], dim=-1)


def flow_matching_loss(
    transformer: Any,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    null_log_count: torch.Tensor | None = None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Rectified-flow loss per sample: ``‖v_Θ(z_t, t) - (ε - x_0)‖²`` averaged over the latent's elements.

    Args:
        transformer: ``SD3Transformer2DModel``; with ``null_log_count`` its processors must be
            :class:`NullTokenAttnProcessor`.
        x0: Scaled clean latents ``(B, C, H, W)``.
        noise: ε ``(B, C, H, W)``.
        sigma: t ∈ [0, 1] ``(B,)`` (the scheduler's σ; its timestep is ``σ · num_train_timesteps``).
        prompt_embeds: ``(B, L, joint_attention_dim)`` from :func:`encode_text`.
        pooled: ``(B, pooled_projection_dim)``.
        null_log_count: log of how many null tokens the last text token stands for ``(B,)``, or None.
        num_train_timesteps: The scheduler's ``num_train_timesteps``.

    Returns:
        ``(B,)`` mean squared velocity error per sample, float32.
    """
    s = sigma.view(-1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    kwargs = None if null_log_count is None else {"null_log_count": null_log_count}
    pred = transformer(hidden_states=xt, timestep=sigma * num_train_timesteps, encoder_hidden_states=prompt_embeds,
                       pooled_projections=pooled, joint_attention_kwargs=kwargs).sample
    return (pred.float() - (noise - x0)).pow(2).mean(dim=(1, 2, 3))


def sample_null_log_count(rng: np.random.Generator, batch: int) -> torch.Tensor:
    """log n per sample: n = 256 (the pipeline default) half the time, n = 0 a tenth, else log-uniform 1–512."""
    u = rng.random(batch)
    n = np.where(u < 0.5, PIPELINE_NULL_TOKENS, np.round(np.exp(rng.uniform(0, math.log(512), batch))))
    log_n = np.log(n)
    log_n[u >= 0.9] = -np.inf
    return torch.from_numpy(log_n).float()


def _checkpoint(models: dict[str, torch.nn.Module], opt: Any, ema: dict, step: int, log: list, start: float,
                scale: float) -> dict[str, Any]:
    return {**{k: m.state_dict() for k, m in models.items()}, "opt": opt.state_dict(), "ema": ema, "step": step,
            "log": log, "elapsed": time.time() - start, "torch_rng": torch.get_rng_state(), "scaling_factor": scale}


def train_transformer(args: argparse.Namespace, captions: list[str], latents: torch.Tensor, scale: float) -> None:
    """Stage 2 (see module docstring)."""
    ckpt_path = args.workdir / "transformer.pt"
    tokenizer, text_encoder, text_encoder_2, transformer = build_models(args.workdir, args.seed)
    transformer.set_attn_processor(NullTokenAttnProcessor())
    models = {"transformer": transformer, "text": text_encoder, "text_2": text_encoder_2}
    params = [p for m in models.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    step, log, elapsed = 0, [], 0.0
    ema = {k: {n: v.detach().clone() for n, v in m.state_dict().items()} for k, m in models.items()}
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        for k, m in models.items():
            m.load_state_dict(ckpt[k])
        opt.load_state_dict(ckpt["opt"])
        ema, step, log, elapsed = ckpt["ema"], ckpt["step"], ckpt["log"], ckpt["elapsed"]
        torch.set_rng_state(ckpt["torch_rng"])
    rng = np.random.default_rng([args.seed, step])

    # Tokenize each distinct caption once; index 0 is the empty prompt used for caption dropout.
    vocab = ["", *sorted(set(captions))]
    ids = tokenizer(vocab, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    caption_index = torch.tensor([vocab.index(c) for c in captions])
    joint_dim = transformer.config.joint_attention_dim

    for m in models.values():
        m.train()
    bar = tqdm(total=args.steps, initial=step, desc="transformer")
    start, last_save = time.time() - elapsed, time.time()
    # The cores are shared with other jobs: every 40 steps try the other thread count for 5 steps and keep
    # the faster one (two OpenMP threads can be several times slower when other processes hold the cores).
    threads, recent, probe = 1, {}, []
    while step < args.steps:
        phase = step % 40
        if args.threads > 1:
            torch.set_num_threads((1 if threads > 1 else args.threads) if phase < 5 else threads)
            if phase == 5 and probe and recent.get(threads):
                if np.median(probe) < 0.9 * np.median(recent[threads]):
                    threads = 1 if threads > 1 else args.threads
                probe = []
        tic = time.perf_counter()
        warm = min(1.0, (step + 1) / args.warmup)
        lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.from_numpy(rng.integers(len(latents), size=args.batch))
        x0 = latents[idx] * scale
        cap = caption_index[idx].clone()
        cap[torch.from_numpy(rng.random(args.batch) < args.cond_dropout)] = 0
        noise = torch.randn_like(x0)
        sigma = torch.sigmoid(torch.randn(args.batch) * args.logit_std + args.logit_mean)  # SD3's logit-normal t
        null_log_count = sample_null_log_count(rng, args.batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            prompt_embeds, pooled = encode_text(text_encoder, text_encoder_2, ids[cap], joint_dim)
            per_sample = flow_matching_loss(transformer, x0, noise, sigma, prompt_embeds, pooled, null_log_count)
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        for k, m in models.items():
            _ema_update(ema[k], m, decay)
        log.append((step, time.time() - start, loss.item()))
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
        stop = bool(args.max_minutes) and time.time() - start > args.max_minutes * 60
        if stop or time.time() - last_save > args.save_every_s or step == args.steps:
            _save(_checkpoint(models, opt, ema, step, log, start, scale), ckpt_path)
            last_save = time.time()
        if stop:
            tqdm.write(f"stopping at step {step}: --max-minutes {args.max_minutes} reached")
            break
    bar.close()


def build_pipeline(workdir: Path, shift: float, use_ema: bool = True, vae_path: Path | None = None):
    """The ``StableDiffusion3Pipeline`` from the transformer checkpoint (fp32, default attention processors)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tokenizer, text_encoder, text_encoder_2, transformer = build_models(workdir)
    ckpt = torch.load(workdir / "transformer.pt", weights_only=False)
    weights = ckpt["ema"] if use_ema else ckpt
    transformer.load_state_dict(weights["transformer"])
    text_encoder.load_state_dict(weights["text"])
    text_encoder_2.load_state_dict(weights["text_2"])
    vae = AutoencoderKL.from_pretrained(vae_path or model_path() / "vae", local_files_only=True)
    vae.register_to_config(shift_factor=0.0)  # SD3's decode computes latents / scaling_factor + shift_factor
    tokenizer_3, text_encoder_3 = build_null_t5(transformer.config.joint_attention_dim)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config(shift)), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, ckpt


@torch.no_grad()
def sample(
    pipe: Any,
    prompts: list[str],
    steps: int = 20,
    guidance: float = 5.0,
    seed: int = 0,
    bf16: bool = True,
    max_sequence_length: int = PIPELINE_NULL_TOKENS,
    shift: float | None = None,
) -> np.ndarray:
    """Plain Euler integration of the flow ODE with classifier-free guidance (what the pipeline's call does).

    Args:
        pipe: A ``StableDiffusion3Pipeline``.
        prompts: ``B`` prompts.
        steps: Euler steps.
        guidance: CFG scale w: v = v_u + w (v_c - v_u).
        seed: Seed of the initial noise.
        bf16: bf16 autocast.
        max_sequence_length: Zero "T5" tokens appended to the text (the pipeline's argument of that name).
        shift: Timestep shift (default: the scheduler config's).

    Returns:
        uint8 images ``(B, H, W, 3)``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    overrides = {} if shift is None else {"shift": shift}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, **overrides)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    cfg = pipe.transformer.config
    latents = torch.randn((len(prompts), cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        cond, uncond, pooled, pooled_u = pipe.encode_prompt(
            list(prompts), None, None, do_classifier_free_guidance=True, negative_prompt=[""] * len(prompts),
            max_sequence_length=max_sequence_length)
        text, pooled = torch.cat([uncond, cond]), torch.cat([pooled_u, pooled])
        for t in scheduler.timesteps:
            v = pipe.transformer(hidden_states=torch.cat([latents, latents]), timestep=t.expand(2 * len(prompts)),
                                 encoder_hidden_states=text, pooled_projections=pooled).sample.float()
            v_u, v_c = v.chunk(2)
            latents = scheduler.step(v_u + guidance * (v_c - v_u), t, latents).prev_sample
        vae = pipe.vae
        images = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample.float()
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def choose_shift(pipe: Any, shifts: list[float], per_prompt: int = 1, guidance: float = 5.0,
                 seed: int = 1000, max_sequence_length: int = 8) -> dict[float, float]:
    """Captioner "all three correct" rate on ``shapes_train`` per timestep shift (seeds apart from the report's)."""
    from diffusion_mdp.prompts import load_prompts
    from diffusion_mdp.shapes.captioner import Captioner

    captioner, prompt_set = Captioner.load(), load_prompts("shapes_train")
    prompts = [p for p in prompt_set.prompts for _ in range(per_prompt)]
    metas = [m for m in prompt_set.metadata for _ in range(per_prompt)]
    scores = {}
    for shift in shifts:
        images = sample(pipe, prompts, guidance=guidance, seed=seed, shift=shift,
                        max_sequence_length=max_sequence_length)
        found = captioner.attributes(images)
        scores[shift] = float(np.mean([all(f[k] == m[k] for k in ("colour", "shape", "count"))
                                       for f, m in zip(found, metas, strict=True)]))
        print(f"shift {shift:g}: all-three accuracy {scores[shift]:.3f}", flush=True)
    return scores


def export(args: argparse.Namespace) -> Path:
    """Stage 3: pick the shift, write the pipeline folder (fp16 safetensors) and the loss curve to ``--export``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipe, ckpt = build_pipeline(args.workdir, shift=1.0)
    scores = choose_shift(pipe, args.shifts) if len(args.shifts) > 1 else {args.shifts[0]: float("nan")}
    shift = max(scores, key=lambda s: (scores[s], -s))
    pipe.scheduler.register_to_config(shift=shift)
    pipe.transformer.half()
    pipe.vae.half()
    out = Path(args.export)
    pipe.save_pretrained(out, safe_serialization=True)

    log = np.array(ckpt["log"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    window = max(1, min(50, len(log) // 2))
    smooth = np.convolve(log[:, 2], np.ones(window) / window, mode="valid")
    ax.plot(log[:, 0], log[:, 2], alpha=0.25, lw=0.5, label="velocity MSE per step")
    ax.plot(log[window - 1 :, 0], smooth, lw=1.5, label=f"moving average ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(f"tiny-shapes-flow transformer training ({log[-1, 1] / 60:.1f} min, {int(log[-1, 0])} steps)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=100)
    summary = {"steps": int(log[-1, 0]), "wall_minutes": float(log[-1, 1] / 60), "final_loss_ma": float(smooth[-1]),
               "shift": shift, "shift_scores": {str(k): v for k, v in scores.items()}, "seed": args.seed}
    (args.workdir / "export_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["latents", "transformer", "export", "all"], default="all")
    p.add_argument("--workdir", type=Path, default=Path("runs/tiny-shapes-flow"))
    p.add_argument("--export", type=Path,
                   default=Path(__file__).resolve().parents[1] / "data" / "tiny-shapes-flow")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-train", type=int, default=60000, help="procedural training images (train combos)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--logit-mean", type=float, default=0.0, help="mean of SD3's logit-normal t")
    p.add_argument("--logit-std", type=float, default=1.0, help="std of SD3's logit-normal t")
    p.add_argument("--cond-dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.997)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop the transformer stage early (0: never)")
    p.add_argument("--save-every-s", type=float, default=120.0)
    p.add_argument("--shifts", type=float, nargs="+", default=[1.0, 2.0, 3.0],
                   help="timestep shifts the export compares on shapes_train (the best is shipped)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    images, captions = _load_or_make_data(args.workdir, args.n_train, args.seed)
    latents, scale = encode_latents(args.workdir, images)
    if args.stage in ("transformer", "all"):
        train_transformer(args, captions, latents, scale)
    if args.stage in ("export", "all"):
        export(args)


if __name__ == "__main__":
    main()
