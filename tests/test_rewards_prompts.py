"""Reward registry, JPEG rewards, prompt sets, and the offline tokenizer."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from diffusion_mdp.prompts import PromptSet, available_prompt_sets, load_prompts
from diffusion_mdp.rewards import available_rewards, make_reward
from diffusion_mdp.tokenizer import build_word_tokenizer


def images(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    flat = np.full((1, 32, 32, 3), 200, np.uint8)
    noise = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    return np.concatenate([flat, noise])


def pil_jpeg_kb(image: np.ndarray) -> float:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def test_jpeg_rewards_are_minus_and_plus_kilobytes_at_quality_95() -> None:
    batch = images()
    expected = np.array([pil_jpeg_kb(im) for im in batch])
    incompress, _ = make_reward("jpeg_incompressibility")(batch, ["x", "y"], [{}, {}])
    compress, _ = make_reward("jpeg_compressibility")(batch, ["x", "y"], [{}, {}])
    np.testing.assert_allclose(incompress, expected)
    np.testing.assert_allclose(compress, -expected)
    assert compress[0] > compress[1]  # the flat image compresses better


def test_weighted_dict_sums_terms_and_reports_each() -> None:
    batch = images()
    reward = make_reward({"jpeg_incompressibility": 2.0, "jpeg_compressibility": 0.5})
    values, info = reward(batch, ["x", "y"], [{}, {}])
    np.testing.assert_allclose(values, 1.5 * info["jpeg_incompressibility"])
    np.testing.assert_allclose(info["jpeg_compressibility"], -info["jpeg_incompressibility"])


def test_callable_passes_through_and_bad_specs_fail() -> None:
    def constant(images, prompts, metadata):
        return np.ones(len(images)), {}

    assert make_reward(constant) is constant
    with pytest.raises(ValueError, match="jpeg_compressibility"):
        make_reward("no_such_reward")
    with pytest.raises(ValueError, match="at least one"):
        make_reward({})
    with pytest.raises(TypeError):
        make_reward(3)  # type: ignore[arg-type]
    assert {"jpeg_compressibility", "jpeg_incompressibility"} <= set(available_rewards())


def test_jpeg_rejects_float_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        make_reward("jpeg_compressibility")(np.zeros((1, 8, 8, 3)), ["x"], [{}])


def test_paper_prompt_sets() -> None:
    animals = load_prompts("imagenet_animals")
    assert len(animals) == 398 and animals.prompts[0] == "tench, Tinca tinca"
    assert animals.prompts[-1] == "puffer, pufferfish, blowfish, globefish"
    assert len(load_prompts("simple_animals")) == 45
    activities = load_prompts("animals_activities")
    assert len(activities) == 135 and activities.prompts[:2] == ["a cat washing the dishes", "a cat riding a bike"]
    assert activities.metadata[0] == {"animal": "cat", "activity": "washing the dishes"}
    assert {"imagenet_animals", "simple_animals", "animals_activities"} <= set(available_prompt_sets())


def test_prompt_file_and_list(tmp_path) -> None:
    path = tmp_path / "mine.txt"
    path.write_text("# my prompts\na red circle\n\ntwo blue squares\n")
    assert load_prompts(path).prompts == ["a red circle", "two blue squares"]
    assert load_prompts(str(path)).name == "mine"
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="printable"):
        load_prompts(["caf\u00e9"])


def test_sampling_is_deterministic_given_the_generator() -> None:
    prompts = PromptSet([f"p{i}" for i in range(10)])
    a = [prompts.sample(np.random.default_rng(5)) for _ in range(3)]
    b = [prompts.sample(np.random.default_rng(5)) for _ in range(3)]
    assert a == b
    draws = [prompts.sample(np.random.default_rng(seed)) for seed in range(200)]
    assert set(draws) == set(range(10))  # uniform over the set: every prompt appears


def test_tokenizer_keeps_every_word_whole(tmp_path) -> None:
    words = ["a", "red", "green", "circle", "circles", "squares", "square", "three", "triangles", "reds"]
    tokenizer = build_word_tokenizer(words, tmp_path)
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == [word + "</w>"], word
    # Out-of-vocabulary text still tokenizes (into characters), it never fails.
    assert len(tokenizer("zebra", add_special_tokens=False).input_ids) == 5
