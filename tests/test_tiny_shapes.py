"""tiny-shapes: the procedural dataset, the bundled pipeline, the captioner and the alignment rewards."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from diffusion_mdp.shapes.dataset import (
    ALL_COMBOS,
    BACKGROUND,
    COLOURS,
    HELDOUT_COMBOS,
    TRAIN_COMBOS,
    ShapeSpec,
    all_specs,
    make_dataset,
    parse_caption,
    render,
)

torch.set_num_threads(2)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x) pixel coordinates."""
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        queue, pixels = deque([(y0, x0)]), []
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(np.array(pixels))
    return comps


def _read_image(image: np.ndarray) -> dict:
    """Independent reading of a drawn image: dominant palette colour, its components, their fill ratios."""
    pixels = image.astype(int)
    names = list(COLOURS)
    dist = np.stack([np.abs(pixels - np.array(COLOURS[n])).sum(-1) for n in names])  # (6, H, W)
    votes = np.bincount(dist.argmin(0)[dist.min(0) < 40], minlength=len(names))
    colour = names[int(votes.argmax())]
    # Coverage of each pixel by the shape colour (anti-aliased edges are a blend with the background);
    # thresholding at 1/2 gives each shape its true area.
    bg, fg = np.array(BACKGROUND), np.array(COLOURS[colour])
    coverage = ((pixels - bg) * (fg - bg)).sum(-1) / ((fg - bg) ** 2).sum()
    comps = _components(coverage > 0.5)
    shapes = []
    for comp in comps:
        top, bottom = comp[:, 0].min(), comp[:, 0].max()
        fill = len(comp) / ((bottom - top + 1) * (comp[:, 1].max() - comp[:, 1].min() + 1))
        # Squares fill their box; an upright triangle has far fewer pixels in its top half than its bottom
        # half (1:3), a circle as many.
        top_half = (comp[:, 0] < (top + bottom) / 2).sum() / max((comp[:, 0] > (top + bottom) / 2).sum(), 1)
        shapes.append("square" if fill > 0.95 else "triangle" if top_half < 0.6 else "circle")
    return {"colour": colour, "count": len(comps), "shapes": shapes, "other_colours": votes.sum() - votes.max()}


def test_captions_match_drawn_content() -> None:
    images, specs = make_dataset(120, seed=7)
    for image, spec in zip(images, specs, strict=True):
        seen = _read_image(image)
        assert seen["colour"] == spec.colour, spec
        assert seen["count"] == spec.count, spec
        assert seen["other_colours"] == 0, spec
        assert seen["shapes"] == [spec.shape] * spec.count, (spec, seen["shapes"])
        assert parse_caption(spec.caption) == spec.as_dict()


def test_dataset_is_deterministic_and_respects_the_split() -> None:
    a, specs_a = make_dataset(50, seed=3, combos=TRAIN_COMBOS)
    b, specs_b = make_dataset(50, seed=3, combos=TRAIN_COMBOS)
    c, _ = make_dataset(50, seed=4, combos=TRAIN_COMBOS)
    assert np.array_equal(a, b) and specs_a == specs_b
    assert not np.array_equal(a, c)
    assert HELDOUT_COMBOS and HELDOUT_COMBOS.isdisjoint(TRAIN_COMBOS)
    assert set(TRAIN_COMBOS) | HELDOUT_COMBOS == set(ALL_COMBOS)
    _, many = make_dataset(2000, seed=5, combos=TRAIN_COMBOS)
    assert not {(s.colour, s.shape) for s in many} & HELDOUT_COMBOS
    assert {s.count for s in many} == {1, 2, 3, 4}
    with pytest.raises(ValueError):
        ShapeSpec(5, "red", "circle")


def test_prompt_sets() -> None:
    from diffusion_mdp.prompts import available_prompt_sets, load_prompts

    assert {"shapes_train", "shapes_heldout", "shapes_counting"} <= set(available_prompt_sets())
    train, heldout, counting = (load_prompts(n) for n in ("shapes_train", "shapes_heldout", "shapes_counting"))
    for prompt_set in (train, heldout, counting):
        for prompt, meta in zip(prompt_set.prompts, prompt_set.metadata, strict=True):
            assert parse_caption(prompt) == meta
    assert {(m["colour"], m["shape"]) for m in heldout.metadata} == HELDOUT_COMBOS
    assert not {(m["colour"], m["shape"]) for m in train.metadata} & HELDOUT_COMBOS
    assert all(m["count"] > 1 for m in counting.metadata)
    assert len(train) == len(all_specs(TRAIN_COMBOS))


def test_bundled_pipeline_loads_offline_and_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from diffusion_mdp.shapes import model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(str(model_path()), local_files_only=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.set_alpha_to_one is False
    assert pipe.safety_checker is None
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a red circle", "three blue triangles"], num_inference_steps=3, eta=1.0, guidance_scale=3.0,
               output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 32, 32, 3)
    assert np.isfinite(out.images).all()
    # Every caption word is a single token of the bundled tokenizer.
    assert len(pipe.tokenizer("three blue triangles").input_ids) == 5


def test_captioner_accuracy_on_fresh_images() -> None:
    from diffusion_mdp.shapes.captioner import Captioner

    captioner = Captioner.load()
    images, specs = make_dataset(400, seed=20261122)
    found = captioner.attributes(images)
    for key in ("count", "colour", "shape"):
        accuracy = np.mean([f[key] == getattr(s, key) for f, s in zip(found, specs, strict=True)])
        assert accuracy >= 0.97, (key, accuracy)
    captions = captioner.caption(images[:20])
    assert sum(c == s.caption for c, s in zip(captions, specs[:20], strict=True)) >= 18


def _hand_drawn_two_red_squares() -> np.ndarray:
    image = np.full((32, 32, 3), 255, np.uint8)
    image[4:14, 5:15] = COLOURS["red"]
    image[17:28, 16:27] = COLOURS["red"]
    return image


def test_rewards_on_hand_made_images() -> None:
    from diffusion_mdp.rewards import available_rewards, make_reward

    assert {"prompt_alignment", "strict_alignment"} <= set(available_rewards())
    image = _hand_drawn_two_red_squares()
    images = np.stack([image, image])
    prompts = ["two red squares", "three green circles"]
    soft = make_reward("prompt_alignment")
    strict = make_reward("strict_alignment")

    # Text only (parsed prompts) and with metadata must agree.
    r_text, info = soft(images, prompts, [{}, {}])
    r_meta, _ = soft(images, prompts, [parse_caption(p) for p in prompts])
    np.testing.assert_allclose(r_text, r_meta)
    assert r_text[0] > 0.9 and r_text[0] > r_text[1] + 0.5
    assert info["colour_match"].tolist() == [1.0, 0.0]
    s, _ = strict(images, prompts, [{}, {}])
    assert s.tolist() == [1.0, 0.0]

    # Partly right prompts get partial credit with the hard variant: 2 of 3 attributes.
    hard = make_reward("prompt_alignment", soft=False)
    r_hard, _ = hard(images[:1], ["two blue squares"], [{}])
    np.testing.assert_allclose(r_hard, [2 / 3])
    assert strict(images[:1], ["two blue squares"], [{}])[0].tolist() == [0.0]

    # A drawn image of another spec flips the ranking.
    circles = render(ShapeSpec(3, "green", "circle"), np.random.default_rng(0))
    r2, _ = soft(np.stack([circles, circles]), prompts, [{}, {}])
    assert r2[1] > r2[0]


def test_reward_rejects_prompts_without_attributes() -> None:
    from diffusion_mdp.rewards import make_reward

    with pytest.raises(ValueError, match="names no count"):
        make_reward("strict_alignment")(np.zeros((1, 32, 32, 3), np.uint8), ["the cat sat on the mat"], [{}])
