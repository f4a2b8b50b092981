"""Preference rewards on tiny random models: PickScore, HPS v2.1, ImageReward.

No weights are downloaded. Each model is built from a tiny config here; the checkpoints' own layouts
(open_clip's for HPS, BLIP's for ImageReward) are written by reference modules in this file that follow the
original code's module names and forward passes, saved to files, and loaded through the rewards' real
loading code.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffusion_mdp.rewards import available_rewards, make_reward
from diffusion_mdp.rewards.aesthetic import (
    AestheticMLP,
    RewardWeightsNotFoundError,
    clip_preprocess,
    image_embeddings,
    text_embeddings,
)
from diffusion_mdp.rewards.hps import hps_preprocess, load_hps_model
from diffusion_mdp.rewards.imagereward import (
    REWARD_MEAN,
    REWARD_STD,
    ImageRewardModel,
    blip_configs,
    load_imagereward_model,
    load_imagereward_tokenizer,
)
from diffusion_mdp.tokenizer import build_word_tokenizer

WORDS = "a an the cat dog horse riding playing chess bike red blue two photo of".split()
PROMPTS = ["a photo of a cat", "two red horse playing chess", "the blue dog"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def images(count: int = 3, height: int = 48, width: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter drawn at random (LayerNorms and embeddings included), so no mapping error hides."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return module.eval()


def tiny_clip_config(tokenizer, projection_dim: int = 8, context: int = 16):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=64,  # open_clip's MLP ratio 4
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=context,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            hidden_act="gelu",
        ),
        projection_dim=projection_dim,
    )


# ------------------------------------------------------------------------------------------------
# PickScore
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pickscore_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    root = tmp_path_factory.mktemp("pickscore")
    tokenizer = build_word_tokenizer(WORDS, model_max_length=16)
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config(tokenizer)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(np.log(50.0))
    model.save_pretrained(root / "model")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / "processor")
    return root / "model", root / "processor"


def test_pickscore_equals_model_card_computation(pickscore_folders):
    from transformers import AutoProcessor, CLIPModel

    model_dir, processor_dir = pickscore_folders
    assert "pickscore" in available_rewards()
    reward = make_reward("pickscore", model=str(model_dir), processor=str(processor_dir), device="cpu", batch_size=2)
    for batch in (images(3), images(3, 40, 64, seed=1)):  # square, and one that is resized and cropped
        values, info = reward(batch, PROMPTS, [{}] * 3)
        assert values.shape == (3,) and values.dtype == np.float64 and info == {}
        # The model card's calc_probs: processor, normalised embeddings, logit_scale.exp() * text @ image.T.
        processor = AutoProcessor.from_pretrained(processor_dir)
        model = CLIPModel.from_pretrained(model_dir).eval()
        with torch.no_grad():
            image_inputs = processor(images=list(batch), return_tensors="pt")
            text_inputs = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
            image = image_embeddings(model, image_inputs["pixel_values"])
            text = text_embeddings(model, text_inputs["input_ids"], text_inputs["attention_mask"])
            image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
            expected = (model.logit_scale.exp() * (text @ image.T)).diagonal().double().numpy()
        np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-5)
    kwargs = dict(model=str(model_dir), processor=str(processor_dir), device="cpu", batch_size=2)
    scaled = make_reward("pickscore", scale=1 / 26, **kwargs)
    np.testing.assert_allclose(scaled(batch, PROMPTS, [{}] * 3)[0], values / 26, rtol=1e-12)


def test_pickscore_missing_weights_name_the_model(pickscore_folders, tmp_path):
    _, processor_dir = pickscore_folders
    with pytest.raises(RewardWeightsNotFoundError, match=r"not-a-real/pickscore.*huggingface-cli download"):
        make_reward("pickscore", model="not-a-real/pickscore", processor=str(processor_dir), device="cpu")
    with pytest.raises(RewardWeightsNotFoundError, match=r"PickScore processor"):
        make_reward("pickscore", processor=str(tmp_path / "none"), device="cpu")


# ------------------------------------------------------------------------------------------------
# HPS v2.1: an open_clip-layout reference (module names and forward of open_clip's model.py/transformer.py)
# ------------------------------------------------------------------------------------------------
class OCResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width))
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class OCTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(OCResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class OCVisionTransformer(nn.Module):
    def __init__(self, image_size: int, patch: int, width: int, layers: int, heads: int, embed_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((image_size // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = OCTransformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).permute(0, 2, 1)  # (B, grid², width)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_post(self.transformer(self.ln_pre(x)))
        return x[:, 0] @ self.proj


class OpenClipReference(nn.Module):
    """open_clip's ``CLIP`` (ViT towers, OpenAI layout): the state-dict names of ``HPS_v2.1_compressed.pt``."""

    def __init__(self, vocab: int, context: int, eot_id: int, embed_dim: int = 8) -> None:
        super().__init__()
        self.visual = OCVisionTransformer(32, 8, 16, 2, 2, embed_dim)
        self.transformer = OCTransformer(16, 2, 2)
        self.token_embedding = nn.Embedding(vocab, 16)
        self.positional_embedding = nn.Parameter(torch.zeros(context, 16))
        self.ln_final = nn.LayerNorm(16)
        self.text_projection = nn.Parameter(torch.zeros(16, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.register_buffer("attn_mask", torch.full((context, context), float("-inf")).triu(1), persistent=False)
        self.eot_id = eot_id

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x, self.attn_mask))
        # open_clip pools at text.argmax(-1): the end token, the largest id of its vocabulary (here: its id)
        eot = (text == self.eot_id).int().argmax(-1)
        return x[torch.arange(x.shape[0]), eot] @ self.text_projection


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    tokenizer = build_word_tokenizer(WORDS, model_max_length=16)
    reference = randomize(OpenClipReference(len(tokenizer), 16, tokenizer.eos_token_id))
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    # the DDP prefix of a training checkpoint, and the attn_mask buffer older open_clip versions saved
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    state["module.attn_mask"] = reference.attn_mask
    torch.save({"state_dict": state}, path)
    return path, reference, tokenizer


def test_hps_checkpoint_loads_into_transformers_clip_with_open_clip_outputs(hps_checkpoint):
    path, reference, tokenizer = hps_checkpoint
    model = load_hps_model(path, tiny_clip_config(tokenizer), device="cpu")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            image_embeddings(model, pixels), reference.encode_image(pixels), atol=1e-5, rtol=1e-5
        )
        ids = tokens["input_ids"]
        torch.testing.assert_close(text_embeddings(model, ids), reference.encode_text(ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.logit_scale, reference.logit_scale)


def test_hpsv2_reward_is_the_feature_cosine(hps_checkpoint):
    path, reference, tokenizer = hps_checkpoint
    model = load_hps_model(path, tiny_clip_config(tokenizer), device="cpu")
    reward = make_reward("hpsv2", checkpoint=model, tokenizer=tokenizer, device="cpu", batch_size=2)
    batch = images(3, 40, 56)
    values, info = reward(batch, PROMPTS, [{}] * 3)
    assert values.shape == (3,) and info == {}
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image = reference.encode_image(hps_preprocess(batch, 32))
        text = reference.encode_text(tokens["input_ids"])
        expected = nn.functional.cosine_similarity(image, text, dim=-1).double().numpy()
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-5)
    assert np.all(np.abs(values) <= 1 + 1e-6)


def test_hps_preprocess_is_torchvisions_tensor_pipeline():
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    # Short side already 32: no resize; the crop offset is round(excess / 2), half to even (5 -> 2, 3 -> 2).
    for width, offset in ((37, 2), (35, 2), (33, 0)):
        batch = images(2, 32, width)
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
        expected = (x[:, :, :, offset : offset + 32] - mean) / std
        torch.testing.assert_close(hps_preprocess(batch, 32), expected, atol=1e-6, rtol=0)
    # Resizing: antialiased bicubic of the float image (not PIL's uint8 path); a constant image stays constant.
    batch = images(2, 64, 96)
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    resized = nn.functional.interpolate(x, size=(32, 48), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(hps_preprocess(batch, 32), (resized[:, :, :, 8:40] - mean) / std)
    flat = hps_preprocess(np.full((1, 50, 70, 3), 200, np.uint8), 32)
    torch.testing.assert_close(flat, ((torch.full((1, 3, 32, 32), 200 / 255)) - mean) / std, atol=1e-5, rtol=0)


def test_hps_missing_or_wrong_checkpoint(tmp_path, hps_checkpoint):
    with pytest.raises(RewardWeightsNotFoundError, match=r"HPS_v2\.1_compressed\.pt from xswu/HPSv2.*huggingface-cli"):
        load_hps_model(tmp_path / "nope.pt", device="cpu")
    torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not an open_clip ViT CLIP checkpoint"):
        load_hps_model(tmp_path / "bad.pt", device="cpu")
    path, _, tokenizer = hps_checkpoint
    with pytest.raises(ValueError, match="does not fit the CLIP config"):
        load_hps_model(path, tiny_clip_config(tokenizer, projection_dim=4), device="cpu")


# ------------------------------------------------------------------------------------------------
# ImageReward: a BLIP-vit-layout reference (module names and forward of BLIP's vit.py)
# ------------------------------------------------------------------------------------------------
class BlipAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class BlipBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = BlipAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class BlipViTReference(nn.Module):
    def __init__(self, image_size: int = 32, patch: int = 16, dim: int = 16, depth: int = 2, heads: int = 2) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList(BlipBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (B, 1 + grid², dim): every token is a cross-attention key


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory: pytest.TempPathFactory):
    from transformers import BertTokenizer, BlipTextModel, BlipVisionConfig

    root = tmp_path_factory.mktemp("imagereward")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(root / "vocab.txt"), model_max_length=64).save_pretrained(root / "tokenizer")
    tokenizer = load_imagereward_tokenizer(str(root / "tokenizer"))
    med = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        pad_token_id=0,
        add_cross_attention=True,
        encoder_width=768,
    )
    (root / "med_config.json").write_text(json.dumps(med))
    vision_config = BlipVisionConfig(
        hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16
    )
    vision_config.layer_norm_eps = 1e-6
    _, text_config = blip_configs(med)
    text_config.encoder_hidden_size = 16
    vit = randomize(BlipViTReference(), seed=1)
    text = randomize(BlipTextModel(text_config, add_pooling_layer=False), seed=2)  # = BLIP's med.py BertModel
    head = randomize(AestheticMLP(16), seed=3)
    state = {f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()}
    state |= {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    state |= {f"mlp.{k}": v for k, v in head.state_dict().items()}
    state["blip.vision_proj.weight"] = torch.zeros(4, 16)  # BLIP's contrastive heads: in the file, unused
    state["blip.text_proj.weight"] = torch.zeros(4, 16)
    torch.save(state, root / "ImageReward.pt")
    return root, vision_config, tokenizer, (vit, text, head)


def reference_imagereward(parts, pixels, tokens) -> np.ndarray:
    vit, text, head = parts
    with torch.no_grad():
        image_embeds = vit(pixels)
        hidden = text(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
            is_decoder=False,
        ).last_hidden_state
        return ((head(hidden[:, 0]) - REWARD_MEAN) / REWARD_STD).double().numpy()


def test_imagereward_checkpoint_loads_and_scores_as_blip(imagereward_files):
    root, vision_config, tokenizer, parts = imagereward_files
    # BLIP's init_tokenizer: [DEC] as BOS and [ENC] appended to the vocabulary (30522 + 2 = 30524 for BERT-base)
    assert tokenizer.bos_token == "[DEC]" and "[ENC]" in tokenizer.all_special_tokens
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(WORDS) + 5, len(WORDS) + 6]
    model = load_imagereward_model(
        root / "ImageReward.pt", root / "med_config.json", "cpu", vision_config=vision_config
    )
    assert isinstance(model, ImageRewardModel)
    reward = make_reward("imagereward", checkpoint=model, tokenizer=tokenizer, device="cpu", batch_size=2)
    batch = images(3, 40, 53)  # resized to 32 × 42, crop offset round(10 / 2) = 5
    values, info = reward(batch, PROMPTS, [{}] * 3)
    assert values.shape == (3,) and info == {}
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=35, truncation=True, return_tensors="pt")
    pixels = clip_preprocess(batch, 32, round_crop=True)
    np.testing.assert_allclose(values, reference_imagereward(parts, pixels, tokens), rtol=1e-5, atol=1e-5)
    # The text encoder reads the whole prompt at [CLS] (bidirectional): the last word changes the score.
    changed = reward(batch[:1], ["a photo of a dog"], [{}])[0]
    assert abs(changed[0] - values[0]) > 1e-6


def test_clip_preprocess_round_crop_is_torchvisions_center_crop():
    # Short side 32 already: only the crop. torchvision's offset is round(excess / 2), half to even.
    for width, offset in ((37, 2), (35, 2), (39, 4), (33, 0)):
        batch = images(2, 32, width)
        ours = clip_preprocess(batch, 32, round_crop=True)
        expected = clip_preprocess(np.ascontiguousarray(batch[:, :, offset : offset + 32]), 32)
        torch.testing.assert_close(ours, expected, atol=0, rtol=0)
    batch = images(2, 32, 35)  # excess 3: CLIPImageProcessor's 3 // 2 = 1, torchvision's round(1.5) = 2
    assert not torch.equal(clip_preprocess(batch, 32), clip_preprocess(batch, 32, round_crop=True))


def test_imagereward_missing_or_wrong_files(tmp_path, imagereward_files):
    root, _, _, _ = imagereward_files
    with pytest.raises(RewardWeightsNotFoundError, match=r"ImageReward\.pt from THUDM/ImageReward.*huggingface-cli"):
        load_imagereward_model(tmp_path / "nope.pt", root / "med_config.json", "cpu")
    with pytest.raises(RewardWeightsNotFoundError, match=r"med_config\.json from THUDM/ImageReward"):
        load_imagereward_model(root / "ImageReward.pt", tmp_path / "nope.json", "cpu")
    torch.save({"blip.visual_encoder.blocks.0.weird.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not an ImageReward checkpoint"):
        load_imagereward_model(tmp_path / "bad.pt", root / "med_config.json", "cpu")
    with pytest.raises(RewardWeightsNotFoundError, match="ImageReward tokenizer"):
        load_imagereward_tokenizer(str(tmp_path / "no-tokenizer"))


def test_full_size_architectures_match_the_published_models():
    # Built on the meta device (no memory). open_clip's ViT-H-14 has 986.11 M parameters (its model table);
    # timm's vit_large_patch16_224 304.33 M of which 1.03 M are the ImageNet head, which BLIP's ViT-L lacks.
    from transformers import CLIPModel

    from diffusion_mdp.rewards.hps import vit_h_14_config

    med = dict(
        vocab_size=30524,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=512,
    )
    with torch.device("meta"):
        hps = CLIPModel(vit_h_14_config())
        imagereward = ImageRewardModel(*blip_configs(med))
    assert round(sum(p.numel() for p in hps.parameters()) / 1e6, 2) == 986.11
    # exact GELU, as open_clip's ViT-H-14 (CLIPConfig's default, quick_gelu, moves features by ~3e-3)
    assert hps.config.vision_config.hidden_act == hps.config.text_config.hidden_act == "gelu"
    vit = sum(p.numel() for p in imagereward.vision.parameters())
    assert vit == 304_326_632 - (1024 * 1000 + 1000)
    assert imagereward.vision.config.layer_norm_eps == 1e-6 and imagereward.text.config.encoder_hidden_size == 1024


def fake_hub_cache(root: Path, repo_id: str, files: dict[str, Path]) -> None:
    """The Hugging Face cache layout (models--org--name/refs/main, snapshots/<commit>/<file>) holding ``files``."""
    commit = "0" * 40
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        (snapshot / name).write_bytes(source.read_bytes())


def test_weights_load_from_the_local_hub_cache(tmp_path, monkeypatch, hps_checkpoint, imagereward_files):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    hps_path, reference, tokenizer = hps_checkpoint
    root, vision_config, ir_tokenizer, parts = imagereward_files
    fake_hub_cache(cache, "xswu/HPSv2", {"HPS_v2.1_compressed.pt": hps_path})
    fake_hub_cache(
        cache,
        "THUDM/ImageReward",
        {"ImageReward.pt": root / "ImageReward.pt", "med_config.json": root / "med_config.json"},
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    hps = load_hps_model(config=tiny_clip_config(tokenizer), device="cpu")  # no path: from the cache
    with torch.no_grad():
        torch.testing.assert_close(image_embeddings(hps, pixels), reference.encode_image(pixels), atol=1e-5, rtol=1e-5)
    model = load_imagereward_model(device="cpu", vision_config=vision_config)
    tokens = ir_tokenizer(PROMPTS[:2], padding="max_length", max_length=35, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ours = model(pixels, tokens["input_ids"], tokens["attention_mask"]).double().numpy()
    np.testing.assert_allclose(ours, reference_imagereward(parts, pixels, tokens), rtol=1e-5, atol=1e-5)
