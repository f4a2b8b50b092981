"""Multi-process training settings (``diffusion_mdp.agents.distributed``), in one CPU process.

What runs here without GPUs: the config's and the launcher's rules, the keywords that reach ``Accelerator`` (DDP
and FSDP), the FSDP2 wrapping plan as accelerate's own policy code computes it on the tiny models, the prepared
model's wrapper, and where the update loop lets gradients synchronise. The exact 2-process = 1-process
equivalence under DDP is ``tests/test_real_scale_distributed.py``. FSDP itself (sharded forwards, gathering
checkpoints) needs CUDA GPUs and is not run by any test here.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch

from diffusion_mdp.agents import ConfigError, TrainConfig
from diffusion_mdp.agents.distributed import (
    Distributed,
    LaunchSettings,
    PreparedModel,
    fsdp_plugin_kwargs,
    fsdp_wrap_plan,
    launch_problems,
    resolve_strategy,
)

FSDP_ENV = ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_AUTO_WRAP_POLICY", "FSDP_MIN_NUM_PARAMS", "WORLD_SIZE")


@pytest.fixture(autouse=True)
def _clean_launch_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*FSDP_ENV, "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)


def problems_of(config: TrainConfig) -> str:
    with pytest.raises(ConfigError) as err:
        config.validate()
    return str(err.value)


# --------------------------------------------------------------------------------------------------
# The config's own rules
# --------------------------------------------------------------------------------------------------
def test_strategy_must_be_known() -> None:
    assert "choose one of auto, ddp, fsdp" in problems_of(TrainConfig(distributed_strategy="deepspeed"))
    for strategy in ("auto", "ddp"):
        TrainConfig(distributed_strategy=strategy).validate()


def test_fsdp_is_for_full_fine_tuning_on_cuda() -> None:
    message = problems_of(TrainConfig(distributed_strategy="fsdp", use_lora=True, device="cpu"))
    assert "use_lora=true: a LoRA run trains with DDP" in message
    assert "needs CUDA GPUs" in message and "distributed_strategy='ddp' for CPU processes" in message
    message = problems_of(TrainConfig(distributed_strategy="fsdp", use_lora=False, mixed_precision="fp16"))
    assert "sharded gradient scaler: use 'bf16'" in message
    assert "use_8bit_adam=true is not supported" in problems_of(
        TrainConfig(distributed_strategy="fsdp", use_lora=False, use_8bit_adam=True)
    )


# --------------------------------------------------------------------------------------------------
# The launcher's settings
# --------------------------------------------------------------------------------------------------
def launched(**env: str) -> LaunchSettings:
    return LaunchSettings.from_environment({"WORLD_SIZE": "2", **env})


def test_strategy_follows_the_launcher() -> None:
    lora, full = TrainConfig(), TrainConfig(use_lora=False)
    assert resolve_strategy(lora, LaunchSettings.from_environment({})) == "single"
    assert resolve_strategy(lora, launched()) == "ddp"
    assert resolve_strategy(full, launched(ACCELERATE_USE_FSDP="true")) == "fsdp"  # auto: as accelerate says
    assert resolve_strategy(full.replace(distributed_strategy="fsdp"), launched()) == "fsdp"
    assert launch_problems(lora, launched()) == []
    assert launch_problems(full, launched(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")) == []


@pytest.mark.parametrize(
    ("config", "env", "expected"),
    [
        (dict(use_lora=False, distributed_strategy="fsdp"), {"WORLD_SIZE": "1"}, "but this is a single process"),
        (dict(use_lora=False), {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "pass --fsdp_version 2"),
        (dict(), {"ACCELERATE_USE_FSDP": "true"}, "FSDP was requested for a LoRA run"),
        (dict(distributed_strategy="ddp"), {"ACCELERATE_USE_FSDP": "true"}, "or launch with --multi_gpu instead"),
        (dict(), {"ACCELERATE_USE_DEEPSPEED": "true"}, "configured for DeepSpeed"),
        (dict(), {"ACCELERATE_MIXED_PRECISION": "bf16"}, "pass --mixed-precision bf16 to diffusion-mdp train"),
        (dict(), {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, "pass --gradient-accumulation-steps"),
        (dict(device="cuda"), {"ACCELERATE_USE_CPU": "True"}, "drop --cpu, or set device='cpu'"),
    ],
)
def test_launch_problems_name_the_fix(config: dict[str, Any], env: dict[str, str], expected: str) -> None:
    settings = LaunchSettings.from_environment({"WORLD_SIZE": "2", **env})
    problems = launch_problems(TrainConfig(**config), settings)
    assert any(expected in problem for problem in problems), problems


def test_a_bad_launch_stops_the_agent_before_any_model_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import gymnasium as gym

    from diffusion_mdp.agents import make_agent

    def no_env(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the environment (and its model) was built before the launch was checked")

    monkeypatch.setattr(gym, "make_vec", no_env)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --use_fsdp, one process, a LoRA run
    config = TrainConfig(output_dir=str(tmp_path), num_epochs=1, samples_per_epoch=8, progress_bar=False)
    with pytest.raises(ConfigError, match=r"(?s)single process.*LoRA trains with DDP"):
        make_agent(config)


def test_one_process_is_inert_without_an_accelerator() -> None:
    dist = Distributed.from_config(TrainConfig(), environ={})
    assert dist.accelerator is None and dist.world_size == 1 and dist.is_main and not dist.sharded
    model, optimizer = torch.nn.Linear(2, 2), object()
    assert dist.prepare(model, optimizer) == (model, optimizer)
    assert dist.any_process(True) and not dist.any_process(False)
    assert dist.average_metrics({"loss": 1.5}) == {"loss": 1.5}
    indices = torch.arange(4)
    assert dist.shard(indices) is indices and list(dist.local_batches(3)) == [0, 1, 2]


# --------------------------------------------------------------------------------------------------
# What reaches Accelerator
# --------------------------------------------------------------------------------------------------
class RecordingAccelerator:
    """Stands in for ``accelerate.Accelerator`` (which needs a process group): records its keywords."""

    calls: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, **kwargs: Any) -> None:
        type(self).calls.append(kwargs)
        plugin = kwargs.get("fsdp_plugin")
        self.is_fsdp2 = plugin is not None and plugin.fsdp_version == 2 and not kwargs["cpu"]
        self.state = SimpleNamespace(distributed_type="FSDP" if self.is_fsdp2 else "MULTI_CPU")


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> type[RecordingAccelerator]:
    import accelerate

    RecordingAccelerator.calls = []
    monkeypatch.setattr(accelerate, "Accelerator", RecordingAccelerator)
    monkeypatch.setenv("WORLD_SIZE", "2")
    return RecordingAccelerator


def test_ddp_keywords_reach_accelerator(recording: type[RecordingAccelerator]) -> None:
    from accelerate.utils import DistributedDataParallelKwargs

    dist = Distributed.from_config(TrainConfig())
    (kwargs,) = recording.calls
    assert dist.strategy == "ddp" and not dist.sharded
    assert kwargs["cpu"] is True and kwargs["mixed_precision"] == "no" and kwargs["device_placement"] is False
    assert "fsdp_plugin" not in kwargs
    (handler,) = kwargs["kwargs_handlers"]
    assert isinstance(handler, DistributedDataParallelKwargs) and handler.broadcast_buffers is False


def test_fsdp_plugin_reaches_accelerator(recording: type[RecordingAccelerator]) -> None:
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    config = TrainConfig(distributed_strategy="fsdp", use_lora=False, device="cuda")  # not validated: no GPU here
    dist = Distributed.from_config(config)
    (kwargs,) = recording.calls
    plugin = kwargs["fsdp_plugin"]
    assert dist.strategy == "fsdp" and dist.sharded and kwargs["cpu"] is False
    assert isinstance(plugin, FullyShardedDataParallelPlugin) and plugin.fsdp_version == 2
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert "kwargs_handlers" not in kwargs


def test_the_accelerate_config_s_fsdp_settings_are_kept(
    recording: type[RecordingAccelerator], monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

    # What `accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy SIZE_BASED_WRAP ...` exports.
    for name, value in {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "2",
        "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP",
        "FSDP_MIN_NUM_PARAMS": "1000",
    }.items():
        monkeypatch.setenv(name, value)
    assert fsdp_plugin_kwargs() == {}  # nothing of ours overrides the launcher's choices
    Distributed.from_config(TrainConfig(use_lora=False, device="cuda"))  # strategy auto: FSDP, as launched
    plugin = recording.calls[0]["fsdp_plugin"]
    assert plugin.fsdp_version == 2 and plugin.min_num_params == 1000
    assert getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy) is size_based_auto_wrap_policy


def test_fsdp_without_fsdp2_is_refused(recording: type[RecordingAccelerator]) -> None:
    config = TrainConfig(distributed_strategy="fsdp", use_lora=False, device="cpu")
    with pytest.raises(ConfigError, match="FSDP runs on CUDA GPUs only"):
        Distributed.from_config(config)  # accelerate drops the FSDP plugin for CPU processes


# --------------------------------------------------------------------------------------------------
# The FSDP2 wrapping plan, through accelerate's own policy code
# --------------------------------------------------------------------------------------------------
def _plan_and_blocks(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    from accelerate import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(**fsdp_plugin_kwargs({}))
    blocks = [name for name, m in model.named_modules() if type(m).__name__ in model._no_split_modules]
    return fsdp_wrap_plan(model, plugin), blocks


def test_fsdp_plan_shards_the_unet_per_block(reference_components: Any) -> None:
    plan, blocks = _plan_and_blocks(reference_components.unet)
    assert plan == blocks and plan  # every ResnetBlock2D, BasicTransformerBlock and up block is its own unit
    kinds = {type(reference_components.unet.get_submodule(name)).__name__ for name in plan}
    assert {"ResnetBlock2D", "BasicTransformerBlock"} <= kinds


def test_fsdp_plan_shards_sd3_and_flux_per_transformer_block(tmp_path: Path) -> None:
    from diffusion_mdp.models import load_components
    from diffusion_mdp.testing import build_reference_tiny_flux_pipeline

    sd3 = load_components("tiny-shapes-flow").unet
    plan, _ = _plan_and_blocks(sd3)
    assert plan == [f"transformer_blocks.{i}" for i in range(sd3.config.num_layers)]
    flux = load_components(build_reference_tiny_flux_pipeline(tmp_path / "flux")).unet
    plan, _ = _plan_and_blocks(flux)
    double = [f"transformer_blocks.{i}" for i in range(flux.config.num_layers)]
    single = [f"single_transformer_blocks.{i}" for i in range(flux.config.num_single_layers)]
    assert plan == double + single


# --------------------------------------------------------------------------------------------------
# The prepared model and the update loop's synchronisation points
# --------------------------------------------------------------------------------------------------
class CountingWrapper(torch.nn.Module):
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.module(x)


def test_prepared_model_looks_like_the_model_and_skips_the_wrapper_without_gradients() -> None:
    inner = torch.nn.Linear(3, 2)
    wrapper = CountingWrapper(inner)
    model = PreparedModel(wrapper, inner)
    assert model.in_features == 3 and model.weight is inner.weight  # attributes of the model itself
    assert len(list(model.parameters())) == len(list(inner.parameters()))  # registered once
    model(torch.zeros(1, 3))
    with torch.no_grad():
        model(torch.zeros(1, 3))
    assert wrapper.calls == 1  # only the forward with gradients went through the (DDP) wrapper


@pytest.mark.parametrize(("accumulation", "expected"), [(1, [False, True, False, True]), (2, [False] * 3 + [True])])
def test_gradients_synchronise_in_the_last_backward_before_each_step(
    reference_pipeline: Path, tmp_path: Path, accumulation: int, expected: list[bool]
) -> None:
    import contextlib

    from diffusion_mdp.agents import make_agent
    from diffusion_mdp.models import load_components

    config = TrainConfig(
        model=str(reference_pipeline),
        output_dir=str(tmp_path),
        num_steps=2,
        num_epochs=1,
        samples_per_epoch=4,
        sample_batch_size=2,
        train_batch_size=2,
        gradient_accumulation_steps=accumulation,
        stat_min_count=1,
        eval_num_samples=0,
        progress_bar=False,
        num_threads=1,
    )
    agent = make_agent(config, load_components(reference_pipeline))
    flags: list[bool] = []

    def record(sync: bool) -> contextlib.AbstractContextManager[None]:
        flags.append(sync)
        return contextlib.nullcontext()

    agent.dist.gradient_sync = record  # type: ignore[method-assign]
    agent.collect_rollouts(0)
    agent.train_on_rollouts(0)
    assert flags == expected  # 2 minibatches x 2 steps; DDP all-reduces once per optimizer step
    assert agent.global_step == flags.count(True)
