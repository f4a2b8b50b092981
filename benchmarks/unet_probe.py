"""What lowers the UNet's own cost on this CPU: one forward (sampling) and one forward+backward (training).

For each of the benchmark models (``bench_models.py``) and each variant it times a bare UNet call on the
classifier-free-guidance batch of the agent benchmark (16 = 8 samples × 2 branches) with a peft LoRA,
interleaving the variants round by round (the machine is shared: only ratios measured side by side mean
anything), and prints the median times and their ratios to fp32:

- ``fp32``; ``bf16`` (autocast); ``bf16+cl`` (autocast + channels_last);
- ``fp32-bf16mm``: float32 tensors, oneDNN allowed to run matmuls/convolutions in bf16 internally;
- ``compile`` / ``bf16+compile``: ``torch.compile`` of the UNet (its compile time printed apart);
- ``merged``: the LoRA merged into the base weights (sampling only: no adapter matmuls).

It also prints the CPU's bf16/AMX flags and, with ``--onednn-verbose``, the ISA oneDNN dispatches to.

    python benchmarks/unet_probe.py --models reference,tiny-shapes,sd-lowattn --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_models import MODELS, build_model

VARIANTS = ("fp32", "bf16", "bf16+cl", "fp32-bf16mm", "compile", "bf16+compile", "merged")


def cpu_flags() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0].split()
    except (OSError, IndexError):
        return "unknown"
    wanted = [f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512f", "avx512_vnni", "avx_vnni")]
    return " ".join(wanted) or "no avx512/amx flags"


def onednn_isa() -> str:
    """The ISA line of oneDNN's verbose output for a bf16 convolution (AMX shows as ``amx``)."""
    code = (
        "import torch\n"
        "x=torch.randn(8,32,32,32); w=torch.nn.Conv2d(32,32,3,padding=1)\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16): w(x)\n"
    )
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout
    lines = [line for line in out.splitlines() if "isa" in line.lower() or "exec" in line]
    isa = [line for line in lines if "info,cpu,isa" in line]
    execs = [line.split(",")[4:6] for line in lines if ",exec," in line]
    return (isa[0] if isa else "no isa line") + f"; first kernels: {execs[:2]}"


def make_unet(model: str, variant: str) -> Any:
    from peft import LoraConfig

    from diffusion_mdp.models import load_components

    unet = load_components(model).unet
    unet.requires_grad_(False)
    if "cl" in variant.split("+"):
        unet.to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    )
    if variant == "merged":
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in unet.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
    if "compile" in variant:
        unet = torch.compile(unet)
    return unet


def run_variant(
    unet: Any, variant: str, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[float, float]:
    x, t, embeds = inputs
    if "cl" in variant.split("+"):
        x = x.contiguous(memory_format=torch.channels_last)
    bf16 = variant.startswith("bf16")
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    if variant == "fp32-bf16mm":
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        torch.backends.mkldnn.conv.fp32_precision = "bf16"
    try:
        start = time.perf_counter()
        with torch.no_grad(), ctx:
            unet(x, t, encoder_hidden_states=embeds)
        fwd = time.perf_counter() - start
        if variant == "merged":
            return fwd, float("nan")
        start = time.perf_counter()
        with ctx:
            out = unet(x, t, encoder_hidden_states=embeds).sample
        out.float().square().mean().backward()
        fwdbwd = time.perf_counter() - start
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = "none"
        torch.backends.mkldnn.conv.fp32_precision = "none"
    for p in unet.parameters():
        p.grad = None
    return fwd, fwdbwd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--onednn-verbose", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; CPU flags: {cpu_flags()}; load {os.getloadavg()}")
    print(
        f"mkldnn available {torch.backends.mkldnn.is_available()}, "
        f"bf16 supported {torch.ops.mkldnn._is_mkldnn_bf16_supported()}"
    )
    if args.onednn_verbose:
        print("oneDNN:", onednn_isa())
    folder = tempfile.mkdtemp()
    variants = args.variants.split(",")
    for name in args.models.split(","):
        model = build_model(name, folder)
        unets = {v: make_unet(model, v) for v in variants}
        cfg = unets["fp32"].config if "fp32" in unets else make_unet(model, "fp32").config
        size = cfg.sample_size
        x = torch.randn(16, cfg.in_channels, size, size)
        t = torch.full((16,), 500)
        embeds = torch.randn(16, 16, cfg.cross_attention_dim)
        compile_s = {}
        for v in variants:  # warm-up (and compilation)
            start = time.perf_counter()
            run_variant(unets[v], v, (x, t, embeds))
            compile_s[v] = time.perf_counter() - start
        times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                times[v].append(run_variant(unets[v], v, (x, t, embeds)))
        print(f"\n{name} (latents {cfg.in_channels}x{size}x{size}, batch 16), load {os.getloadavg()[0]:.1f}")
        print(f"{'variant':<14}{'fwd ms':>9}{'x fp32':>8}{'fwd+bwd ms':>12}{'x fp32':>8}{'1st call s':>12}")
        base_f = np.median([a for a, _ in times["fp32"]]) if "fp32" in times else float("nan")
        base_b = np.median([b for _, b in times["fp32"]]) if "fp32" in times else float("nan")
        for v in variants:
            f = float(np.median([a for a, _ in times[v]]))
            b = float(np.median([c for _, c in times[v]]))
            print(f"{v:<14}{1000 * f:>9.1f}{f / base_f:>8.2f}{1000 * b:>12.1f}{b / base_b:>8.2f}{compile_s[v]:>12.1f}")


if __name__ == "__main__":
    main()
