"""Configuration of a DDPO/RWR run: one dataclass and its strict validation.

Every field carries a docstring (the string literal right below it); :func:`field_docs` reads them so
that ``diffusion-mdp train --help`` prints the same text. A config comes from, in increasing priority:
the dataclass defaults, a ``--preset`` (``presets.py``), a config file (``config_files.py``: TOML, JSON or
YAML as its extension says, flat ``key = value`` or one ``[train]`` table), and flags (:func:`build_config`).
:meth:`TrainConfig.validate` checks everything that can be checked before any model is loaded and
raises :class:`ConfigError` naming the fix.

Why one file of ~500 lines: it is the contract of a run's settings, whose fields (~65, each with its
docstring: ~150 lines) and checks (``validate``: ~210 lines) are read together; splitting them would put a
field's default and its accepted range in two files. Presets and file parsing, which are not that contract,
live in their own modules.

>>> cfg = TrainConfig(samples_per_epoch=10, sample_batch_size=4)
>>> try:
...     cfg.validate()
... except ConfigError as err:
...     print(str(err).splitlines()[0])
invalid config: samples_per_epoch=10 is not a multiple of sample_batch_size=4: make it one (e.g. samples_per_epoch=8)
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import json
import math
import os
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config_files import CONFIG_FILE_FORMATS, JSON_OBJECT_FIELDS, load_config_file  # noqa: F401  (re-exported)
from .errors import ConfigError
from .presets import PRESETS  # the presets live in their own module

ALGORITHMS = ("ddpo_is", "ddpo_sf", "rwr", "sparse_rwr")
ADVANTAGE_MODES = ("per_prompt", "batch", "group")
MIXED_PRECISION = ("no", "auto", "bf16", "fp16")
DISTRIBUTED_STRATEGIES = ("auto", "ddp", "fsdp")  # agents/distributed.py
SCHEDULES = ("constant", "linear")


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults follow the paper's DDPO-IS (appendix D.1) where sensible."""

    # --- run -------------------------------------------------------------------------------------
    name: str = "ddpo"
    """Run name; outputs go to ``<output_dir>/<name>/``."""
    output_dir: str = "runs"
    """Parent folder of run folders."""
    algorithm: str = "ddpo_is"
    """One of ddpo_is (PPO-clip, importance sampling), ddpo_sf (REINFORCE), rwr, sparse_rwr, flow_grpo."""
    seed: int = 0
    """Seed of everything random (prompts, noise, shuffling); a run is reproducible on CPU."""
    device: str = "cpu"
    """Torch device for the model and the rollouts."""
    num_threads: int = 0
    """torch.set_num_threads value (0: leave torch's default)."""
    distributed_strategy: str = "auto"
    """Under accelerate launch: ddp (replicated model, gradients all-reduced; LoRA, or models that fit one GPU),
    fsdp (FSDP2: parameters, gradients and AdamW states sharded; full fine-tuning on CUDA) or auto (fsdp when
    accelerate launch is configured for FSDP, else ddp). Ignored with one process. See docs/distributed.md."""

    # --- the MDP ---------------------------------------------------------------------------------
    model: str = "tiny-shapes"
    """Model: 'tiny-shapes' (bundled), a diffusers pipeline folder, or a hub id."""
    reward: str = "jpeg_compressibility"
    """Registered reward name (see diffusion_mdp.rewards.available_rewards()) or a reward server URL http://host:port."""
    reward_kwargs: str = ""
    """Keyword arguments for the named reward's factory, as a JSON object: '{"attribute_weight": 0.5}' (in a
    TOML or JSON config file, a table works too). '' passes none."""
    reward_timeout: float = 60.0
    """Reward server (URL rewards only): seconds to wait for one answer before the attempt counts as failed."""
    reward_retries: int = 2
    """Reward server: attempts after the first for connection errors, timeouts and 5xx answers."""
    reward_token: str = ""
    """Reward server: the shared secret it was started with (--token); '' reads $DIFFUSION_MDP_REWARD_TOKEN.
    Never written to the run folder."""
    prompts: str = ""
    """Training prompt set name or .txt file ('' = the model's default set)."""
    eval_prompts: str = ""
    """Held-out prompt set for evaluation ('' = the training prompts)."""
    num_steps: int = 20
    """Denoising steps T per trajectory (the paper: 50)."""
    eta: float = 1.0
    """DDIM η of the stochastic policy (the paper: 1.0)."""
    guidance_scale: float = 5.0
    """Classifier-free guidance weight w, used both when sampling and when training (the paper: 5)."""

    # --- sampling --------------------------------------------------------------------------------
    num_epochs: int = 100
    """Number of epochs (rounds): each samples samples_per_epoch trajectories then trains on them."""
    samples_per_epoch: int = 256
    """Trajectories collected per epoch (the paper: 256)."""
    sample_batch_size: int = 8
    """Trajectories denoised together (the vector env's num_envs)."""

    async_reward: bool = False
    """Score each sample batch's rewards in a background thread while the next batch is sampled."""

    # --- advantages ------------------------------------------------------------------------------
    advantage_mode: str = "per_prompt"
    """per_prompt (stat tracking, the paper), batch (batch mean/std) or group (k samples per prompt, GRPO)."""
    stat_buffer_size: int = 16
    """per_prompt: how many recent rewards per prompt the tracker keeps."""
    stat_min_count: int = 16
    """per_prompt: below this many rewards for a prompt, batch statistics are used instead."""
    group_size: int = 4
    """group: samples per prompt (must divide sample_batch_size)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to ± this."""
    adv_std_floor: float = 0.0
    """Advantages divide by max(σ, this) (reward units; 0: the paper's plain σ). A floor keeps a saturated
    reward's noise (prompt alignment at ~0.95) from becoming full-size advantages."""

    # --- optimisation ----------------------------------------------------------------------------
    train_batch_size: int = 8
    """Trajectories per minibatch (each contributes timestep_fraction * T steps)."""
    gradient_accumulation_steps: int = 1
    """Minibatches per optimizer step (gradients are always accumulated over a minibatch's timesteps)."""
    num_inner_epochs: int = 1
    """Passes over each epoch's samples (DDPO-IS and RWR; DDPO-SF requires 1)."""
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's timesteps trained on (a random subset per sample)."""
    timesteps_per_forward: int = 1
    """Steps of each trajectory stacked into one UNet forward and backward in training (c): the same gradient
    (a step's loss is a mean over its rows) from fewer, larger calls, for c times the activation memory. In the
    main job (train batch 32, both guidance branches: 64 rows a call at c = 1) on 2 CPU cores, c = 2 took
    0.86–0.90× the training time of c = 1, c = 5 0.89–0.95×, c = 10 1.01–1.06× (README, "Benchmarks")."""
    sde_window_size: int = 0
    """Sample stochastically (DDIM: η; flow matching: the SDE) on a window of this many consecutive steps only,
    deterministically elsewhere, and train on the window's steps (any algorithm); 0: every step."""
    sde_window_max_start: int = -1
    """Each epoch's SDE window starts at a step drawn uniformly from 0..this (-1: num_steps - size; 0: always the
    first, noisiest steps)."""
    learning_rate: float = 3e-4
    """AdamW learning rate (the paper: 3e-4 with LoRA)."""
    lr_schedule: str = "constant"
    """constant or linear (linear decays to lr_end over the run; SB3 LinearSchedule)."""
    lr_end: float = 0.0
    """Final learning rate of the linear schedule."""
    lr_warmup_steps: int = 0
    """Raise the learning rate linearly from lr/N to lr over the first N optimizer steps (0: no warm-up). AdamW's
    first steps move every weight by about lr whatever its gradient's size (its second-moment estimate is still
    one sample), which in full fine-tuning is the largest change of the whole run."""
    clip_range: float = 1e-4
    """PPO clip range ε on the per-step ratio (the paper: 1e-4, with mean log-probs)."""
    clip_range_schedule: str = "constant"
    """constant or linear (linear decays to clip_range_end)."""
    clip_range_end: float = 1e-5
    """Final clip range of the linear schedule."""
    max_grad_norm: float = 1.0
    """Gradient norm clipping (0 disables)."""
    adam_beta1: float = 0.9
    """AdamW β1."""
    adam_beta2: float = 0.999
    """AdamW β2."""
    adam_weight_decay: float = 1e-4
    """AdamW weight decay."""
    adam_epsilon: float = 1e-8
    """AdamW ε."""
    kl_coef: float = 0.0
    """Coefficient β of a KL penalty to the pre-trained policy (with LoRA: the adapter disabled; in full
    fine-tuning: a frozen copy of the UNet, one more UNet in memory); 0 disables."""
    unconditional_gradient: bool = True
    """Backpropagate through the unconditional branch of classifier-free guidance too (the exact gradient of
    the guided policy, the paper's). False computes ε_∅ without gradient in training: the same forward values
    (the ratio at the first minibatch stays 1), a cheaper backward, and the semi-gradient w·∂ε_c/∂θ."""
    rwr_beta: float = 1.0
    """RWR temperature β: weights ∝ exp(r / β) (softmax over the epoch's samples)."""
    sparse_rwr_percentile: float = 0.9
    """Sparse RWR: only samples with reward ≥ this quantile of the epoch's rewards are trained on."""
    rwr_reencode: bool = False
    """RWR / sparse RWR regress the VAE's encoding of each sample's decoded image instead of the sampler's x_0
    latent: the kind of latent the model was trained on (its own sampled latents carry high frequencies the
    encoder never produces; the base tiny-shapes model's ε-loss on them is 2× that on encoded images)."""
    rwr_guided_loss: bool = True
    """RWR / sparse RWR regress the classifier-free-guided prediction ε̃ (the paper's choice: training the
    conditional branch alone degraded after the first round there) or, if False, the conditional ε_c only."""

    # --- model adaptation and precision ----------------------------------------------------------
    use_lora: bool = True
    """Train a LoRA adapter on the UNet's attention projections (else full fine-tuning)."""
    lora_rank: int = 4
    """LoRA rank r."""
    lora_alpha: float = 4.0
    """LoRA α (scale α / r)."""
    mixed_precision: str = "no"
    """no, bf16, fp16 (CUDA only) or auto (bf16 where supported). Trainable weights stay float32."""
    channels_last: bool = False
    """Run the UNet with channels_last memory format."""
    merge_lora_for_sampling: bool = False
    """Merge the LoRA into the attention weights while sampling (the rollouts skip the adapter's extra matmuls)
    and restore the saved base weights after; log-probs then differ from training's in the last float bits."""
    gradient_checkpointing: bool = False
    """Recompute the UNet's activations in the backward pass (less memory, ~30% slower training steps)."""
    use_8bit_adam: bool = False
    """bitsandbytes' 8-bit AdamW (optimizer state in 8 bits; matters for full fine-tuning, not LoRA)."""

    # --- outputs ---------------------------------------------------------------------------------
    save_every: int = 10
    """Write a checkpoint every this many epochs (and at the end, and on Ctrl-C / SIGTERM / SIGHUP)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (>= 2: a damaged newest one falls back to the one before)."""
    eval_every: int = 10
    """Evaluate on the held-out prompts every this many epochs (and before the first and after the last)."""
    eval_num_samples: int = 16
    """Images per evaluation (η = 0, fixed seeds: the same noise every time)."""
    image_every: int = 10
    """Save a grid of training samples (with prompts and rewards) every this many epochs (0: never)."""
    log_formats: str = "csv,tensorboard"
    """SB3 logger outputs, comma separated: stdout, csv, tensorboard, log, json."""
    progress_bar: bool = True
    """Show tqdm progress bars."""

    # ---------------------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Check the config; raise :class:`ConfigError` listing every problem with its fix. Returns self.

        Every field is checked here, before any model loads: the ranges say what works (η in (0, 1], AdamW
        β in [0, 1), finite floats, ...), and each message names the field, the accepted range and the fix.
        """
        problems: list[str] = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        # Types first (a dataclass built by hand may hold anything): the range checks below assume them.
        for f in dataclasses.fields(self):
            kind = _TYPES[f.type if isinstance(f.type, str) else f.type.__name__]
            value = getattr(self, f.name)
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                problems.append(f"{f.name}={value!r} must be a {kind.__name__}")
        if problems:
            raise ConfigError("invalid config: " + "\n  ".join(problems))
        finite: set[str] = set()  # fields whose value is not NaN/inf (the others have their problem already)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{f.name}={value} must be a finite number (got NaN or infinity)")
            else:
                finite.add(f.name)

        def check(key: str, ok: bool, rule: str, fix: str = "") -> None:
            if key in finite:
                need(ok, f"{key}={getattr(self, key)!r} {rule}" + (f": {fix}" if fix else ""))

        need(self.algorithm in ALGORITHMS, f"algorithm={self.algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
        need(
            self.advantage_mode in ADVANTAGE_MODES,
            f"advantage_mode={self.advantage_mode!r}: choose one of {', '.join(ADVANTAGE_MODES)}",
        )
        need(
            self.mixed_precision in MIXED_PRECISION,
            f"mixed_precision={self.mixed_precision!r}: choose one of {', '.join(MIXED_PRECISION)}",
        )
        need(
            self.distributed_strategy in DISTRIBUTED_STRATEGIES,
            f"distributed_strategy={self.distributed_strategy!r}: choose one of {', '.join(DISTRIBUTED_STRATEGIES)}",
        )
        if self.distributed_strategy == "fsdp":
            self._validate_fsdp(problems)
        for key in ("lr_schedule", "clip_range_schedule"):
            need(getattr(self, key) in SCHEDULES, f"{key}={getattr(self, key)!r}: choose constant or linear")
        for key in (
            "num_epochs",
            "samples_per_epoch",
            "sample_batch_size",
            "train_batch_size",
            "num_steps",
            "gradient_accumulation_steps",
            "num_inner_epochs",
            "timesteps_per_forward",
            "stat_buffer_size",
            "group_size",
            "lora_rank",
            "save_every",
            "eval_every",
        ):
            check(key, getattr(self, key) >= 1, "must be >= 1")
        for key in (
            "stat_min_count",
            "eval_num_samples",
            "image_every",
            "num_threads",
            "reward_retries",
            "lr_warmup_steps",
        ):
            check(key, getattr(self, key) >= 0, "must be >= 0")
        check("seed", 0 <= self.seed < 2**63, "must be in [0, 2**63)", "seeds are non-negative integers")
        check(
            "keep_checkpoints",
            self.keep_checkpoints >= 2,
            "must be >= 2",
            "the checkpoint before the newest is the fallback if the newest is damaged",
        )
        check(
            "sde_window_size",
            0 <= self.sde_window_size <= self.num_steps
            and self.sde_window_max_start <= self.num_steps - self.sde_window_size,
            f"must be in 0..num_steps={self.num_steps}, with sde_window_max_start={self.sde_window_max_start} "
            "at most num_steps - sde_window_size",
            "0 trains every step; Flow-GRPO's window is a few steps (e.g. 2-4) starting at most at max_start",
        )
        for key in ("learning_rate", "adv_clip_max", "rwr_beta", "lora_alpha", "adam_epsilon", "reward_timeout"):
            check(key, getattr(self, key) > 0, "must be > 0")
        for key in ("lr_end", "max_grad_norm", "kl_coef", "adam_weight_decay"):
            check(key, getattr(self, key) >= 0, "must be >= 0")
        check("clip_range", 0 < self.clip_range < 1, "must be in (0, 1)", "the PPO ratio is clipped to [1 - ε, 1 + ε]")
        check("clip_range_end", 0 <= self.clip_range_end < 1, "must be in [0, 1)")
        for key in ("adam_beta1", "adam_beta2"):
            check(key, 0 <= getattr(self, key) < 1, "must be in [0, 1)", "AdamW's moment decay rates (e.g. 0.9, 0.999)")
        check(
            "eta",
            0 < self.eta <= 1,
            "must be in (0, 1]",
            "η > 0 gives the policy a density (log-probabilities); η > 1 makes the DDIM variance exceed the "
            "noise level and the sample diverges to NaN (the paper: 1.0)",
        )
        check("guidance_scale", self.guidance_scale >= 1, "must be >= 1 (1 disables guidance)")
        check("timestep_fraction", 0 < self.timestep_fraction <= 1, "must be in (0, 1]")
        check("sparse_rwr_percentile", 0 <= self.sparse_rwr_percentile < 1, "must be in [0, 1)")
        if self.advantage_mode == "per_prompt" and self.stat_buffer_size >= 1:
            check(
                "stat_min_count",
                self.stat_min_count <= self.stat_buffer_size,
                f"exceeds stat_buffer_size={self.stat_buffer_size}",
                "the tracker keeps at most stat_buffer_size rewards per prompt, so per-prompt statistics would "
                "never be used; lower stat_min_count or raise stat_buffer_size",
            )
        if self.samples_per_epoch >= 1 and self.sample_batch_size >= 1:
            need(
                self.samples_per_epoch % self.sample_batch_size == 0,
                f"samples_per_epoch={self.samples_per_epoch} is not a multiple of "
                f"sample_batch_size={self.sample_batch_size}: make it one (e.g. samples_per_epoch="
                f"{max(1, self.samples_per_epoch // self.sample_batch_size) * self.sample_batch_size})",
            )
        if self.samples_per_epoch >= 1 and self.train_batch_size >= 1:
            need(
                self.samples_per_epoch % self.train_batch_size == 0,
                f"train_batch_size={self.train_batch_size} does not divide samples_per_epoch="
                f"{self.samples_per_epoch}: pick a divisor",
            )
            num_minibatches = self.samples_per_epoch // max(1, self.train_batch_size)
            need(
                self.gradient_accumulation_steps <= max(1, num_minibatches),
                f"gradient_accumulation_steps={self.gradient_accumulation_steps} exceeds the "
                f"{num_minibatches} minibatches of an epoch: lower it",
            )
        if self.advantage_mode == "group" and self.group_size >= 1:
            need(
                self.sample_batch_size % self.group_size == 0 and self.group_size >= 2,
                f"advantage_mode='group' needs group_size >= 2 dividing sample_batch_size="
                f"{self.sample_batch_size} (got group_size={self.group_size})",
            )
        need(self.adv_std_floor >= 0, f"adv_std_floor={self.adv_std_floor} must be >= 0 (0 disables the floor)")
        need(
            self.kl_coef == 0 or self.algorithm not in ("rwr", "sparse_rwr"),
            f"kl_coef={self.kl_coef} with algorithm={self.algorithm}: RWR regresses x_0 and has no per-step policy "
            "Gaussian for a KL penalty; set kl_coef=0, or use ddpo_is / ddpo_sf",
        )
        if self.algorithm == "ddpo_sf":
            need(
                self.num_inner_epochs == 1,
                "ddpo_sf is on-policy (one gradient step per batch of fresh samples): set num_inner_epochs=1 "
                "or use algorithm=ddpo_is",
            )
        if self.use_8bit_adam:
            import importlib.util

            need(
                importlib.util.find_spec("bitsandbytes") is not None,
                "use_8bit_adam=true needs bitsandbytes: pip install 'diffusion-mdp[real-scale]' (or bitsandbytes), "
                "or set use_8bit_adam=false",
            )
        need(
            self.mixed_precision != "fp16" or self.device.startswith("cuda"),
            "mixed_precision='fp16' is for CUDA devices; use 'bf16' on CPU",
        )
        device_problem = device_error(self.device)
        if device_problem:
            problems.append(f"device={self.device!r}: {device_problem}")
        for fmt in filter(None, (f.strip() for f in self.log_formats.split(","))):
            need(
                fmt in ("stdout", "csv", "tensorboard", "log", "json"),
                f"log_formats: unknown format {fmt!r} (use stdout, csv, tensorboard, log, json)",
            )
        name_problem = run_name_error(self.name)
        if name_problem:
            problems.append(f"name={self.name!r}: {name_problem}")
        need(bool(self.output_dir.strip()), "output_dir is empty: give the parent folder of run folders (e.g. runs)")
        if self.reward.startswith(("http://", "https://")):
            from urllib.parse import urlsplit

            try:
                parts = urlsplit(self.reward)
                ok = bool(parts.hostname) and (parts.port is None or parts.port > 0)
            except ValueError:
                ok = False
            need(ok, f"reward={self.reward!r} is not a valid server URL: use http://host:port")
            need(
                not self.reward_kwargs.strip(),
                "reward_kwargs are for a named reward's factory; a reward server takes its reward's arguments when "
                "it starts (python -m diffusion_mdp.rewards.server --help): leave reward_kwargs empty",
            )
        try:
            parse_json_object(self.reward_kwargs, "reward_kwargs")
        except ConfigError as exc:
            problems.append(str(exc))
        self._validate_names(problems)
        if problems:
            raise ConfigError("invalid config: " + "\n  ".join(problems))
        return self

    def _validate_fsdp(self, problems: list[str]) -> None:
        """FSDP shards full fine-tuning on CUDA; the combinations it was not built for are refused here."""
        prefix = "distributed_strategy='fsdp'"
        if self.use_lora:
            problems.append(
                f"{prefix} shards full fine-tuning, but use_lora=true: a LoRA run trains with DDP (the frozen base "
                "replicated, only the adapter's gradients all-reduced); set use_lora=false, or distributed_strategy="
                "'ddp'"
            )
        if not self.device.startswith("cuda"):
            problems.append(
                f"{prefix} needs CUDA GPUs (accelerate runs FSDP on GPUs only), but device={self.device!r}: set "
                "device='cuda', or distributed_strategy='ddp' for CPU processes"
            )
        if self.mixed_precision == "fp16":
            problems.append(
                f"{prefix} with mixed_precision='fp16' would need a sharded gradient scaler: use 'bf16' or 'no'"
            )
        if self.use_8bit_adam:
            problems.append(f"{prefix} with use_8bit_adam=true is not supported: use AdamW (use_8bit_adam=false)")

    def _validate_names(self, problems: list[str]) -> None:
        """Check reward, prompt-set and model names against the registries (cheap: no model is loaded)."""
        from diffusion_mdp.models import ModelNotAvailableError, resolve_model
        from diffusion_mdp.prompts import load_prompts
        from diffusion_mdp.rewards import available_rewards

        rewards = available_rewards()
        if self.reward not in rewards and not self.reward.startswith(("http://", "https://")):
            problems.append(f"reward={self.reward!r} is not registered; available: {', '.join(rewards)}")
        elif self.reward in rewards:
            problem = reward_kwargs_error(self.reward, self.reward_kwargs)
            if problem:
                problems.append(problem)
        for key in ("prompts", "eval_prompts"):
            value = getattr(self, key)
            if value:
                try:
                    load_prompts(value)
                except (ValueError, FileNotFoundError, TypeError) as exc:
                    problems.append(f"{key}: {exc}")
        try:
            location, is_local = resolve_model(self.model)
        except (ModelNotAvailableError, FileNotFoundError) as exc:
            problems.append(f"model: {exc}")
            return
        scheduler_file = Path(location) / "scheduler" / "scheduler_config.json"
        if is_local and scheduler_file.is_file() and self.num_steps >= 1:
            try:
                train_steps = int(json.loads(scheduler_file.read_text()).get("num_train_timesteps", 1000))
            except (ValueError, TypeError):
                return
            if self.num_steps > train_steps:
                problems.append(
                    f"num_steps={self.num_steps} exceeds the model's {train_steps} training timesteps: "
                    f"use at most {train_steps} (the paper: 50)"
                )

    # ---------------------------------------------------------------------------------------------
    @property
    def reward_arguments(self) -> dict[str, Any]:
        """``reward_kwargs`` parsed: the keyword arguments the reward's factory is called with."""
        return parse_json_object(self.reward_kwargs, "reward_kwargs")

    @property
    def run_dir(self) -> Path:
        """``<output_dir>/<name>``."""
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (unknown keys raise :class:`ConfigError`)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a flat mapping; unknown keys and wrong types raise :class:`ConfigError`."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        problems = []
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            key = key.replace("-", "_")
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"unknown config key {key!r}{hint}")
                continue
            try:
                kwargs[key] = _coerce(value, known[key].type, key)
            except ConfigError as exc:
                problems.append(str(exc))
        if problems:
            raise ConfigError("invalid config: " + "\n  ".join(problems))
        return cls(**kwargs)


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def parse_json_object(text: str, key: str) -> dict[str, Any]:
    """The JSON object in a field such as ``reward_kwargs`` ('' is ``{}``).

    >>> parse_json_object('{"attribute_weight": 0.5}', "reward_kwargs")
    {'attribute_weight': 0.5}
    >>> parse_json_object("attribute_weight=0.5", "reward_kwargs")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    diffusion_mdp.agents.errors.ConfigError: reward_kwargs is not JSON (...): write an object, e.g. '{"name": 0.5}'
    """
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{key} is not JSON ({exc}): write an object, e.g. '{{\"name\": 0.5}}'") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a JSON object {{name: value}}, got {type(value).__name__}: {text!r}")
    return value


def _coerce(value: Any, type_name: Any, key: str) -> Any:
    """Convert a value from a file or a flag to the field's type, strictly."""
    if key in JSON_OBJECT_FIELDS and isinstance(value, Mapping):
        # A table in a config file, or a dict from Python: kept as its JSON text, like the flag's.
        try:
            return json.dumps(dict(value), sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key}: {exc}; use numbers, strings, booleans and lists") from exc
    kind = _TYPES[type_name if isinstance(type_name, str) else type_name.__name__]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    if isinstance(value, str) and kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    raise ConfigError(f"{key} must be a {kind.__name__}, got {value!r}")


def field_docs() -> dict[str, str]:
    """Field name -> its docstring (the string literal after the field in the class body)."""
    source = textwrap.dedent(inspect.getsource(TrainConfig))
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
        ):
            docs[node.target.id] = str(following.value.value)
    return docs


def reward_kwargs_error(reward: str, reward_kwargs: str) -> str | None:
    """Why the registered reward ``reward``'s factory cannot take ``reward_kwargs`` (None if it can).

    Only the factory's signature is checked: nothing is built, so no reward model is loaded.
    """
    from diffusion_mdp.rewards import reward_factory

    try:
        arguments = parse_json_object(reward_kwargs, "reward_kwargs")
    except ConfigError:
        return None  # validate() reports the JSON itself
    if not arguments:
        return None
    factory = reward_factory(reward)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return None  # a builtin or C factory: its own error will name the argument
    try:
        signature.bind(**arguments)
    except TypeError as exc:
        keyword = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        takes = [name for name, p in signature.parameters.items() if p.kind in keyword]
        return (
            f"reward_kwargs={reward_kwargs!r} do not fit the factory of reward {reward!r} ({exc}); it takes: "
            f"{', '.join(takes) or 'no arguments'}"
        )
    return None


def run_name_error(name: str) -> str | None:
    """Why ``name`` cannot be a run folder's name (None if it can): one path component, no way out of output_dir."""
    if not name or not name.strip():
        return "give a non-empty name"
    if name in (".", "..") or any(sep in name for sep in ("/", "\\", os.sep, "\0")):
        return "a run name is one folder name inside output_dir: no '/', '\\', '.' or '..' (e.g. name=my-run)"
    if name != name.strip():
        return "remove the leading/trailing spaces"
    return None


def device_error(device: str) -> str | None:
    """Why ``device`` cannot be used here (None if it can): not a torch device, or its backend is missing."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return "not a torch device: use 'cpu', 'cuda', 'cuda:<index>' or 'mps'"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available in this environment (torch.cuda.is_available() is False): use device='cpu'"
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            return f"there are {torch.cuda.device_count()} CUDA devices (indices 0..{torch.cuda.device_count() - 1})"
    elif parsed.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            return "MPS is not available on this machine: use device='cpu'"
    elif parsed.type not in ("cpu", "xpu", "npu", "hpu"):
        return f"device type {parsed.type!r} is not supported for training: use 'cpu', 'cuda' or 'mps'"
    return None


def build_config(
    preset: str | None = None, config_file: str | os.PathLike[str] | None = None, **overrides: Any
) -> TrainConfig:
    """Defaults < preset < config file < overrides, validated."""
    values: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; available presets: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    if config_file:
        values.update(load_config_file(config_file))
    values.update(overrides)
    return TrainConfig.from_dict(values).validate()
