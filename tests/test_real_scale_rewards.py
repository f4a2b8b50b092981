"""Real-scale rewards on tiny random models: aesthetic, BERTScore, VLM captions, CLIP score, async and remote.

No weights are downloaded: CLIP, BERT and LLaVA are built from tiny configs here; only the shipped LAION
head is real.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_mdp.rewards import make_reward
from diffusion_mdp.rewards.aesthetic import (
    HEAD_SHA256,
    AestheticMLP,
    AestheticScorer,
    RewardWeightsNotFoundError,
    clip_preprocess,
    default_head_path,
    load_aesthetic_head,
)
from diffusion_mdp.rewards.alignment import (
    BERTScorer,
    Captioner,
    CaptionSimilarity,
    CLIPScore,
    VLMCaptioner,
)
from diffusion_mdp.rewards.executor import AsyncReward
from diffusion_mdp.rewards.server import RemoteReward, RemoteRewardError, serve
from diffusion_mdp.tokenizer import build_word_tokenizer

WORDS = "a an the cat dog horse riding playing chess bike is what happening in this image red blue two".split()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def images(count: int = 3, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    tokenizer = build_word_tokenizer(WORDS, model_max_length=16)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=768,  # the LAION head's input width
    )
    torch.manual_seed(0)
    return CLIPModel(config).eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory):
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = tmp_path_factory.mktemp("bert") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(str(vocab), model_max_length=64)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    torch.manual_seed(0)
    return BertModel(config).eval(), tokenizer


# ------------------------------------------------------------------------------------------------
# Aesthetic
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(512, 512), (64, 64), (300, 500), (100, 50), (224, 224)])
def test_clip_preprocess_equals_reference_processor(shape):
    from transformers import CLIPImageProcessor

    batch = np.random.default_rng(1).integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    reference = CLIPImageProcessor()(images=list(batch), return_tensors="pt").pixel_values
    ours = clip_preprocess(batch)
    assert ours.shape == reference.shape == (2, 3, 224, 224)
    # Bit-exact PIL resampling: only float32 rounding of the normalisation differs.
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_shipped_head_is_the_published_file_and_its_arithmetic():
    import hashlib

    path = default_head_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == HEAD_SHA256
    head = load_aesthetic_head()
    state = torch.load(path, map_location="cpu", weights_only=True)
    embed = torch.randn(2, 768, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    embed = embed / embed.norm(dim=-1, keepdim=True)
    # Hand-computed forward: five affine maps, no activation (dropout is off at eval).
    x = embed.numpy()
    for index in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{index}.weight"].double().numpy().T + state[f"layers.{index}.bias"].double().numpy()
    ours = head(embed.float()).double().numpy()
    np.testing.assert_allclose(ours, x[:, 0], rtol=1e-5, atol=1e-5)


def test_aesthetic_scorer_shapes_batching_determinism(tiny_clip):
    model, _ = tiny_clip
    scorer = AestheticScorer(model, device="cpu", batch_size=2)
    batch = images(5)
    scores, info = scorer(batch, ["p"] * 5, [{}] * 5)
    assert scores.shape == (5,) and scores.dtype == np.float64 and np.isfinite(scores).all()
    assert info == {}
    one_by_one = np.concatenate([scorer(batch[i : i + 1], ["p"], [{}])[0] for i in range(5)])
    np.testing.assert_allclose(scores, one_by_one, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(scores, scorer(batch, ["p"] * 5, [{}] * 5)[0])
    # The reward is the head applied to the normalised embedding of the preprocessed image.
    pixels = clip_preprocess(batch, 32)
    embeds = model.get_image_features(pixel_values=pixels)
    embeds = embeds if isinstance(embeds, torch.Tensor) else embeds.pooler_output
    expected = scorer.head(embeds / embeds.norm(dim=-1, keepdim=True)).detach().numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


def test_aesthetic_registered_and_missing_weights_errors(tiny_clip, tmp_path):
    model, _ = tiny_clip
    reward = make_reward("aesthetic", clip_model=model, device="cpu")
    assert reward(images(2), ["a", "b"], [{}, {}])[0].shape == (2,)
    with pytest.raises(RewardWeightsNotFoundError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth"):
        load_aesthetic_head(tmp_path / "nope.pth")
    with pytest.raises(RewardWeightsNotFoundError, match=r"model\.safetensors"):
        AestheticScorer(str(tmp_path / "no-clip"), device="cpu")
    with pytest.raises(RewardWeightsNotFoundError, match=r"not-a-real/clip-model.*huggingface-cli download"):
        AestheticScorer("not-a-real/clip-model", device="cpu")
    assert isinstance(load_aesthetic_head(), AestheticMLP)


# ------------------------------------------------------------------------------------------------
# BERTScore and captioners
# ------------------------------------------------------------------------------------------------
BERT_CANDS = ["a cat riding a bike", "the dog", "a horse", "two red chess", "the image"]
BERT_REFS = ["a cat is riding", "the dog", "two red chess", "a blue horse playing", "what is happening in this image"]


@pytest.mark.parametrize("layer", [1, 2])
@pytest.mark.parametrize("idf", [False, True])
def test_bertscorer_equals_bert_score_package(tiny_bert, tmp_path, layer, idf):
    import bert_score

    model, tokenizer = tiny_bert
    folder = tmp_path / "bert"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # The package loads the encoder from the folder and keeps its first `layer` layers; ours reads hidden_states.
    expected = bert_score.score(
        BERT_CANDS, BERT_REFS, model_type=str(folder), num_layers=layer, idf=idf, device="cpu", nthreads=0
    )
    corpus = BERT_REFS if idf else None
    scorer = BERTScorer(model, tokenizer, layer=layer, device="cpu", batch_size=2, idf_corpus=corpus)
    ours = scorer.score(BERT_CANDS, BERT_REFS)
    for key, value in zip(("precision", "recall", "f1"), expected, strict=True):
        assert ours[key].shape == (5,)
        torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours["f1"][1], torch.tensor(1.0))  # identical sentences
    # The same from a folder, and the caller's encoder is left whole (bert_score would truncate its layers).
    from_folder = BERTScorer(str(folder), layer=layer, device="cpu", idf_corpus=corpus)
    torch.testing.assert_close(from_folder.score(BERT_CANDS, BERT_REFS)["recall"], ours["recall"], atol=1e-6, rtol=0)
    assert len(model.encoder.layer) == 2
    with pytest.raises(ValueError, match=r"hidden states 0\.\.2"):
        BERTScorer(model, tokenizer, layer=3, device="cpu")


def test_bertscore_idf_weights(tiny_bert):
    # idf from a corpus, as bert_score's get_idf_dict: log((M + 1) / (df + 1)); unseen tokens log(M + 1).
    model, tokenizer = tiny_bert
    plain = BERTScorer(model, tokenizer, layer=2, device="cpu")
    assert plain.idf is None
    scorer = BERTScorer(model, tokenizer, layer=2, device="cpu", idf_corpus=["a cat", "a dog", "a horse"])
    a_id, cat_id, bike_id = tokenizer.convert_tokens_to_ids(["a", "cat", "bike"])
    assert scorer.idf[a_id] == pytest.approx(np.log(4 / 4)) and scorer.idf[cat_id] == pytest.approx(np.log(4 / 2))
    assert scorer.idf[bike_id] == pytest.approx(np.log(4))
    torch.testing.assert_close(scorer.score(["a cat"], ["a cat"])["recall"], torch.tensor([1.0]))
    assert plain.score(["a dog"], ["a cat"])["recall"] != scorer.score(["a dog"], ["a cat"])["recall"]


class FixedCaptioner:
    def __init__(self, captions: list[str]) -> None:
        self.captions = captions

    def caption(self, images: np.ndarray) -> list[str]:
        return self.captions[: len(images)]


def test_caption_similarity_takes_any_captioner(tiny_bert):
    model, tokenizer = tiny_bert
    captioner = FixedCaptioner(["a cat riding a bike", "a dog playing chess"])
    assert isinstance(captioner, Captioner)
    reward = make_reward(
        "caption_similarity",
        captioner=captioner,
        bertscore_model=model,
        bertscore_tokenizer=tokenizer,
        bertscore_layer=2,
        device="cpu",
    )
    values, info = reward(images(2), ["a cat riding a bike", "a horse"], [{}, {}])
    assert values.shape == (2,) and set(info) == {"precision", "recall", "f1"}
    assert values[0] == pytest.approx(1.0, abs=1e-5) and values[1] < values[0]
    np.testing.assert_array_equal(values, info["recall"])
    assert reward.last_captions == captioner.captions
    # The bundled tiny-shapes captioner plugs into the same interface.
    from diffusion_mdp.rewards.alignment import tiny_shapes_captioner

    shapes = tiny_shapes_captioner("cpu")
    assert isinstance(shapes, Captioner)
    shapes_reward = CaptionSimilarity(shapes, BERTScorer(model, tokenizer, layer=2, device="cpu"))
    assert shapes_reward(images(2, 32), ["a red circle", "two blue squares"], [{}, {}])[0].shape == (2,)


def tiny_llava():
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_word_tokenizer([*WORDS, "?"], model_max_length=64)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=image_token,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval(), processor


def test_vlm_captioner_and_vlm_prompt_alignment(tiny_bert):
    model, processor = tiny_llava()
    captioner = VLMCaptioner(model, processor, max_new_tokens=4, device="cpu", batch_size=2)
    assert captioner.prompt == "USER: <image>\nWhat is happening in this image? ASSISTANT:"
    batch = images(3, 32)
    captions = captioner.caption(batch)
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    assert captioner.caption(batch) == captions  # greedy: deterministic
    assert [captioner.caption(batch[i : i + 1])[0] for i in range(3)] == captions  # batching does not matter
    bert, tokenizer = tiny_bert
    reward = make_reward(
        "vlm_prompt_alignment",
        vlm=model,
        vlm_processor=processor,
        max_new_tokens=4,
        bertscore_model=bert,
        bertscore_tokenizer=tokenizer,
        bertscore_layer=2,
        device="cpu",
    )
    values, _ = reward(batch, ["a cat riding a bike"] * 3, [{}] * 3)
    assert values.shape == (3,) and np.isfinite(values).all()


def test_clip_score(tiny_clip):
    model, tokenizer = tiny_clip
    reward = make_reward("clip_score", clip_model=model, tokenizer=tokenizer, device="cpu")
    batch = images(2)
    values, info = reward(batch, ["a cat", "a red dog"], [{}, {}])
    assert values.shape == (2,)
    np.testing.assert_allclose(values, 100 * info["cosine"])
    assert np.all(np.abs(info["cosine"]) <= 1 + 1e-6)
    raw = CLIPScore(model, tokenizer, scale=1.0, device="cpu")(batch, ["a cat", "a red dog"], [{}, {}])[0]
    np.testing.assert_allclose(raw, info["cosine"], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Execution: background executor and the HTTP server (loopback only)
# ------------------------------------------------------------------------------------------------
def test_async_reward_overlaps_and_matches():
    started, release = threading.Event(), threading.Event()

    def slow(imgs, prompts, metadata):
        started.set()
        assert release.wait(5)
        return imgs.reshape(len(imgs), -1).mean(1).astype(np.float64), {}

    batch = images(2, 8)
    with AsyncReward(slow) as scorer:
        future = scorer.submit(batch, ["a", "b"], [{}, {}])
        assert started.wait(5) and not future.done()  # running in the background while we "sample"
        batch[:] = 0  # the caller may reuse its buffer: the reward got a copy
        release.set()
        values, _ = future.result(timeout=5)
    np.testing.assert_allclose(values, images(2, 8).reshape(2, -1).mean(1))


@pytest.fixture()
def reward_server():
    servers = []

    def start(reward):
        server = serve(reward, "127.0.0.1", 0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append(server)
        host, port = server.server_address[:2]
        return f"http://{host}:{port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_remote_reward_equals_local(reward_server):
    url = reward_server("jpeg_compressibility")
    remote = make_reward(url, timeout=10, retries=0)
    assert isinstance(remote, RemoteReward) and remote.health()["status"] == "ok"
    batch = images(3, 32)
    local_values, local_info = make_reward("jpeg_compressibility")(batch, ["a"] * 3, [{}] * 3)
    values, info = remote(batch, ["a"] * 3, [{"k": 1}] * 3)
    np.testing.assert_array_equal(values, local_values)
    assert set(info) == set(local_info)


def test_remote_reward_failures_are_clear(reward_server):
    def broken(imgs, prompts, metadata):
        raise RuntimeError("model exploded")

    url = reward_server(broken)
    with pytest.raises(RemoteRewardError, match=r"failed after 2 attempt\(s\).*HTTP 500.*model exploded") as err:
        RemoteReward(url, timeout=5, retries=1, backoff=0.01)(images(1, 8), ["a"], [{}])
    assert url in str(err.value)
    # Nothing listens on this port (a freshly closed server's): connection refused, every attempt named.
    dead = serve("jpeg_compressibility", "127.0.0.1", 0)
    port = dead.server_address[1]
    dead.server_close()
    dead_url = f"http://127.0.0.1:{port}"
    with pytest.raises(RemoteRewardError, match=r"failed after 3 attempt\(s\)") as err:
        RemoteReward(dead_url, timeout=2, retries=2, backoff=0.01)(images(1, 8), ["a"], [{}])
    assert dead_url in str(err.value) and "attempt 3" in str(err.value)


def test_remote_reward_failure_in_env_is_a_reward_error(reward_server, reference_pipeline: Path):
    import gymnasium as gym

    from diffusion_mdp.mdp import RewardError

    def broken(imgs, prompts, metadata):
        raise RuntimeError("out of memory")

    url = reward_server(broken)
    env = gym.make_vec(
        "DenoisingMDP-v0",
        num_envs=2,
        model=str(reference_pipeline),
        prompts=["a red circle"],
        num_steps=1,
        reward=url,
        reward_kwargs={"retries": 0, "timeout": 5},
    )
    env.reset(seed=0)
    with pytest.raises(RewardError, match=url):
        env.step(np.zeros((2, 4, 32, 32), np.float32))


def test_agent_async_reward_equals_sync(reference_pipeline: Path, tmp_path: Path):
    from diffusion_mdp.agents import TrainConfig, make_agent

    def agent(async_reward: bool):
        cfg = TrainConfig(
            name=f"a{async_reward}",
            output_dir=str(tmp_path),
            model=str(reference_pipeline),
            prompts="",
            reward="jpeg_compressibility",
            num_steps=1,
            samples_per_epoch=4,
            sample_batch_size=2,
            train_batch_size=2,
            async_reward=async_reward,
            progress_bar=False,
        )
        return make_agent(cfg)

    sync_agent, async_agent = agent(False), agent(True)
    sync_stats, async_stats = sync_agent.collect_rollouts(0), async_agent.collect_rollouts(0)
    assert sync_stats == async_stats
    assert torch.equal(sync_agent.buffer.rewards, async_agent.buffer.rewards)
    assert sync_agent.buffer.rewards[:, -1].abs().min() > 0 and not sync_agent.buffer.rewards[:, :-1].any()
    async_agent.reward_executor.shutdown()


def test_agent_async_reward_failure_names_the_batch(reward_server, reference_pipeline: Path, tmp_path: Path):
    from diffusion_mdp.agents import TrainConfig, make_agent
    from diffusion_mdp.mdp import RewardError

    def broken(imgs, prompts, metadata):
        raise RuntimeError("VLM crashed")

    url = reward_server(broken)
    cfg = TrainConfig(
        name="remote",
        output_dir=str(tmp_path),
        model=str(reference_pipeline),
        prompts="",
        reward=url,
        num_steps=1,
        samples_per_epoch=2,
        sample_batch_size=2,
        train_batch_size=2,
        async_reward=True,
        progress_bar=False,
    )
    agent = make_agent(cfg)
    agent.mdp.reward_fn.retries = 0  # RemoteReward: fail at once
    with pytest.raises(RewardError, match=r"sample batch 1/1.*VLM crashed.*checkpoint \(none written yet\)"):
        agent.collect_rollouts(0)
