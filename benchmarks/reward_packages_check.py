"""Do ``hpsv2`` and ``imagereward`` compute what the original packages' own code computes? A one-off check.

The packages cannot be installed beside this project's pins (see the modules' docstrings), so their source is
read from downloaded wheels and run with the imports they cannot satisfy here stubbed: torchvision and
fairscale (only their transforms, datasets and checkpoint wrappers are referenced, never called on this
path), and three helpers transformers 5 dropped from ``modeling_utils`` (ImageReward's ``med.py``). Tiny
random models are built from the originals' own classes, saved in their checkpoint layouts, and loaded
through this project's loaders.

    pip download --no-deps -d /tmp/wheels open-clip-torch==3.3.0 image-reward==1.5 timm==0.6.13 ftfy==6.3.1 wcwidth
    python benchmarks/reward_packages_check.py /tmp/wheels

Prints the largest differences: open_clip's ``CLIP`` features and HPS score vs ``load_hps_model``;
open_clip's ``SimpleTokenizer`` vs ``HPSv2Score.tokenize`` (a ``CLIPTokenizer`` on open_clip's BPE);
ImageReward's ``vit.py`` + ``med.py`` composed as its ``score_gard`` (with PIL preprocessing, the package's
torchvision-on-PIL path) vs ``ImageRewardScore``. Figures are in docs/real_scale.md, section 7.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
import tempfile
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import transformers.modeling_utils as modeling_utils
import transformers.pytorch_utils as pytorch_utils
from PIL import Image
from torch import nn

# transformers' classes before the torchvision stub goes in: it must not believe torchvision is installed
from transformers import (  # isort: skip
    BertTokenizer, BlipTextModel, BlipVisionConfig, BlipVisionModel, CLIPConfig, CLIPModel, CLIPTokenizer,
)  # fmt: skip

from diffusion_mdp.rewards.aesthetic import CLIP_MEAN, CLIP_STD, image_embeddings, text_embeddings
from diffusion_mdp.rewards.hps import HPSv2Score, load_hps_model
from diffusion_mdp.rewards.imagereward import (
    REWARD_MEAN,
    REWARD_STD,
    ImageRewardScore,
    load_imagereward_model,
    load_imagereward_tokenizer,
)

STUBBED = ("torchvision", "fairscale")
WORDS = "a an the cat dog horse riding playing chess bike red blue two photo of".split()
PROMPTS = [
    "a photo of a cat",
    "Two RED horses, playing chess on a bike!!",
    "an astronaut riding a horse on the moon, 4k, trending on artstation",
    "café  crème   brûlée",
    " ".join(["word"] * 100),
    "A painting of a squirrel eating a burger",
]


class _Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Any ``torchvision.*`` / ``fairscale.*`` import yields a MagicMock package (imported, never called here)."""

    def find_spec(self, name: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(name, self, is_package=True) if name.split(".")[0] in STUBBED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> mock.MagicMock:
        module = mock.MagicMock()
        module.__path__, module.__spec__ = [], spec
        return module

    def exec_module(self, module: object) -> None:
        pass


def unpack(wheels: Path, prefix: str, into: Path) -> Path:
    (wheel,) = sorted(wheels.glob(f"{prefix}-*.whl"))[-1:]
    target = into / wheel.stem
    zipfile.ZipFile(wheel).extractall(target)
    return target


def randomize(*modules: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            module.eval()


def check_hps(tmp: Path) -> None:
    import open_clip
    from open_clip.model import CLIP
    from open_clip.tokenizer import SimpleTokenizer

    reference = CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
        output_dict=True,  # as hpsv2 builds it
    )
    randomize(reference)
    torch.save({"state_dict": reference.state_dict()}, tmp / "HPS_v2.1_compressed.pt")
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    text |= dict(max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    text |= dict(hidden_act="gelu", layer_norm_eps=1e-5)  # open_clip's ViT-H-14: exact GELU (CLIPConfig: quick_gelu)
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    vision |= dict(image_size=32, patch_size=8, hidden_act="gelu", layer_norm_eps=1e-5)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    model = load_hps_model(tmp / "HPS_v2.1_compressed.pt", config, device="cpu")
    assert isinstance(model, CLIPModel)
    simple = SimpleTokenizer()
    (tmp / "vocab.json").write_text(json.dumps(simple.encoder))
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    specials = dict(bos_token="<start_of_text>", eos_token="<end_of_text>", unk_token="<end_of_text>")
    tokenizer = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), pad_token="<end_of_text>", **specials)
    scorer = HPSv2Score(model, tokenizer, device="cpu")
    ids_reference = simple(PROMPTS)
    ids = scorer.tokenize(PROMPTS)
    print(f"open_clip {open_clip.__version__}: tokens equal SimpleTokenizer's: {bool(torch.equal(ids, ids_reference))}")
    pixels = torch.randn(len(PROMPTS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = reference(pixels, ids_reference)  # normalised features
        image = nn.functional.normalize(image_embeddings(model, pixels), dim=-1)
        words = nn.functional.normalize(text_embeddings(model, ids), dim=-1)
        score = (out["image_features"] @ out["text_features"].T).diagonal()  # hpsv2's score
    print(f"  image features max|diff| {(image - out['image_features']).abs().max().item():.2e}")
    print(f"  text features  max|diff| {(words - out['text_features']).abs().max().item():.2e}")
    print(f"  HPS score      max|diff| {((image * words).sum(-1) - score).abs().max().item():.2e}")


def check_imagereward(root: Path, tmp: Path) -> None:
    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        setattr(modeling_utils, name, getattr(pytorch_utils, name))
    modeling_utils.find_pruneable_heads_and_indices = None  # imported, unused

    def load(name: str, file: str) -> object:
        spec = importlib.util.spec_from_file_location(name, root / "ImageReward" / "models" / "BLIP" / file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    vit_py, med_py = load("ir_vit", "vit.py"), load("ir_med", "med.py")

    def invert_attention_mask(self: nn.Module, mask: torch.Tensor) -> torch.Tensor:  # transformers 4's
        ext = (mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]).float()
        return (1.0 - ext) * torch.finfo(torch.float32).min

    med_py.BertModel.invert_attention_mask = invert_attention_mask
    med_py.BertModel.init_weights = lambda self: None  # transformers 5's weight tying machinery; drawn below
    if not hasattr(med_py.BertModel, "get_head_mask"):
        med_py.BertModel.get_head_mask = lambda self, head_mask, n, *args: [None] * n
    (tmp / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(tmp / "vocab.txt"), model_max_length=64).save_pretrained(tmp / "tokenizer")
    tokenizer = load_imagereward_tokenizer(str(tmp / "tokenizer"))
    med = dict(hidden_act="gelu", hidden_size=32, intermediate_size=64, layer_norm_eps=1e-12, model_type="bert")
    med |= dict(max_position_embeddings=64, num_attention_heads=2, num_hidden_layers=2, pad_token_id=0)
    med |= dict(vocab_size=len(tokenizer), encoder_width=32, add_cross_attention=True)
    (tmp / "med_config.json").write_text(json.dumps(med))
    config = med_py.BertConfig.from_json_file(str(tmp / "med_config.json"))
    config.encoder_width = 32
    vit = vit_py.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2)
    text = med_py.BertModel(config=config, add_pooling_layer=False)
    mlp = nn.Sequential(
        nn.Linear(32, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )  # fmt: skip
    randomize(vit, text, mlp)
    state = {f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()}
    state |= {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    state |= {f"mlp.layers.{k}": v for k, v in mlp.state_dict().items()}
    torch.save(state, tmp / "ImageReward.pt")
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    vision.image_size, vision.patch_size, vision.layer_norm_eps = 32, 16, 1e-6
    model = load_imagereward_model(tmp / "ImageReward.pt", tmp / "med_config.json", "cpu", vision_config=vision)
    assert isinstance(model.vision, BlipVisionModel) and isinstance(model.text, BlipTextModel)
    batch = np.random.default_rng(0).integers(0, 256, (3, 48, 61, 3), dtype=np.uint8)
    prompts = PROMPTS[:3]
    ours = ImageRewardScore(model, tokenizer=tokenizer, device="cpu")(batch, prompts, [{}] * 3)[0]
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    reference = []
    with torch.no_grad():
        for image, prompt in zip(batch, prompts, strict=True):
            # torchvision on a PIL image: Resize(32, BICUBIC) is PIL's resize, CenterCrop offsets round(excess / 2)
            pil = Image.fromarray(image)
            w, h = pil.size
            new_w, new_h = (int(32 * w / h), 32) if h <= w else (32, int(32 * h / w))
            pil = pil.resize((new_w, new_h), Image.BICUBIC)
            top, left = round((new_h - 32) / 2.0), round((new_w - 32) / 2.0)
            x = torch.from_numpy(np.asarray(pil.crop((left, top, left + 32, top + 32))).astype(np.float32) / 255)
            x = ((x.permute(2, 0, 1) - mean) / std)[None]
            tokens = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            embeds = vit(x)  # ImageReward.score_gard from here on
            hidden = text(
                tokens.input_ids,
                attention_mask=tokens.attention_mask,
                encoder_hidden_states=embeds,
                encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long),
                return_dict=True,
            ).last_hidden_state
            reference.append(((mlp(hidden[:, 0, :].float()) - REWARD_MEAN) / REWARD_STD).item())
    print(f"image-reward 1.5 (vit.py + med.py): scores {np.round(reference, 4).tolist()}")
    print(f"  ImageReward score max|diff| {np.abs(ours - np.array(reference)).max():.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheels", type=Path, help="folder with the downloaded wheels (see above)")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = [unpack(args.wheels, name, tmp) for name in ("open_clip_torch", "timm", "ftfy", "wcwidth")]
        imagereward = unpack(args.wheels, "image_reward", tmp)
        sys.meta_path.insert(0, _Stub())
        sys.path[:0] = [str(p) for p in paths]
        check_hps(tmp)
        check_imagereward(imagereward, tmp)


if __name__ == "__main__":
    main()
