"""The procedural shapes_geneval judge: exact on fresh generator images, strict on wrong ones."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_mdp.prompts import load_prompts
from diffusion_mdp.rewards import available_rewards, make_reward
from diffusion_mdp.rewards.shapes_geneval import MIN_PURITY, detect_objects, judge_images
from diffusion_mdp.shapes.dataset import COLOURS, ShapeSpec, make_dataset, render


def test_judge_reads_fresh_procedural_images():
    # A seed no model or captioner was trained on; every colour-shape pair and counts 1-4.
    images, specs = make_dataset(200, seed=20261201)
    verdict = judge_images(images, [s.as_dict() for s in specs])
    assert verdict["correct"].mean() >= 0.98
    assert (verdict["num_objects"] == np.array([s.count for s in specs])).mean() >= 0.98


def test_judge_reads_noisy_images():
    images, specs = make_dataset(100, seed=7)
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 8, images.shape), 0, 255).astype(np.uint8)
    assert judge_images(noisy, [s.as_dict() for s in specs])["correct"].mean() >= 0.98


@pytest.mark.parametrize("spec", [ShapeSpec(4, "blue", "triangle"), ShapeSpec(2, "yellow", "circle"),
                                  ShapeSpec(3, "orange", "square")])
def test_wrong_count_colour_or_shape_is_rejected(spec):
    image = render(spec, np.random.default_rng(3))[None]
    right = spec.as_dict()
    assert judge_images(image, [right])["correct"].tolist() == [True]
    other_colour = next(c for c in COLOURS if c != spec.colour)
    other_shape = "circle" if spec.shape != "circle" else "square"
    for wrong in ({**right, "count": spec.count % 4 + 1}, {**right, "colour": other_colour},
                  {**right, "shape": other_shape}):
        assert judge_images(image, [wrong])["correct"].tolist() == [False], wrong


def test_five_shapes_are_not_four():
    # The captioner's count head stops at four; the judge counts what is there.
    four = render(ShapeSpec(4, "red", "square"), np.random.default_rng(0))
    extra = render(ShapeSpec(1, "red", "square"), np.random.default_rng(1))
    canvas = np.full((32, 64, 3), 255, np.uint8)
    canvas[:, :32], canvas[:, 32:] = four, extra
    assert len(detect_objects(canvas)) == 5
    assert not judge_images(canvas[None], [{"count": 4, "colour": "red", "shape": "square"}])["correct"][0]


def test_two_coloured_object_is_not_clean():
    image = render(ShapeSpec(1, "green", "square"), np.random.default_rng(0)).copy()
    green = np.all(image == COLOURS["green"], axis=-1)
    rows = np.nonzero(green.any(1))[0]
    image[rows[: len(rows) // 2]] = np.where(green[rows[: len(rows) // 2], :, None], COLOURS["red"],
                                            image[rows[: len(rows) // 2]])
    (obj,) = detect_objects(image)
    assert obj.purity < MIN_PURITY
    assert not judge_images(image[None], [{"count": 1, "colour": "green", "shape": "square"}])["colour_match"][0]


def test_rewards_registered_and_prompt_sets():
    assert {"shapes_geneval", "shapes_geneval_soft", "shapes_geneval_graded", "shapes_geneval_miss"} <= set(
        available_rewards()
    )
    ps = load_prompts("shapes_four")
    assert len(ps) == 15 and all(m["count"] == 4 for m in ps.metadata)
    assert len(load_prompts("shapes_four_heldout")) == 3
    images = np.stack([render(ShapeSpec(**m), np.random.default_rng(i)) for i, m in enumerate(ps.metadata[:3])])
    prompts = list(ps.prompts[:3])
    prompts[1], meta = ps.prompts[4], [ps.metadata[0], ps.metadata[4], ps.metadata[2]]  # image 1 is mislabelled
    strict, info = make_reward("shapes_geneval")(images, prompts, meta)
    soft, _ = make_reward("shapes_geneval_soft")(images, prompts, meta)
    miss, _ = make_reward("shapes_geneval_miss")(images, prompts, meta)
    assert strict.tolist() == [1.0, 0.0, 1.0]
    assert miss.tolist() == [0.0, 1.0, 0.0]  # the sign-flipped control
    assert soft[0] == 1.0 and 0.0 <= soft[1] < 1.0 and set(info) >= {"count_match", "num_objects"}
    graded, _ = make_reward("shapes_geneval_graded")(images, prompts, meta)
    attributes = info["colour_match"] + info["shape_match"]
    assert graded.tolist() == (strict + 0.25 * attributes).tolist() and graded[0] == 1.5
    assert make_reward("shapes_geneval_graded", attribute_weight=0.0)(images, prompts, meta)[0].tolist() == [
        1.0, 0.0, 1.0
    ]
    with pytest.raises(ValueError, match="attribute_weight must be >= 0"):
        make_reward("shapes_geneval_graded", attribute_weight=-1.0)
    with pytest.raises(ValueError, match="2 images but 1"):
        judge_images(images[:2], meta[:1])
