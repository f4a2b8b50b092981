"""Prompt-alignment rewards at scale: caption with a VLM, compare the caption with the prompt (DDPO, section 6.3).

The paper asks LLaVA "what is happening in this image?" about each sample and rewards the BERTScore *recall*
of the prompt against the caption: how much of the prompt the caption covers (a long caption that mentions
more than the prompt is not penalised). The pieces here are separable:

- :class:`Captioner`: anything with ``caption(images uint8 (B, H, W, 3)) -> list[str]``. :class:`VLMCaptioner`
  wraps any transformers image-text-to-text model (LLaVA by default); the bundled tiny-shapes captioner
  (``diffusion_mdp.shapes.captioner.Captioner``) already has the method, so it plugs in unchanged.
- :class:`BERTScorer`: BERTScore (Zhang et al., 2020) computed by the ``bert_score`` package (an own
  implementation that kept [CLS]/[SEP] out of the matching scored up to 0.095 apart from it on the same tiny
  encoder, so the package's is used): contextual token embeddings from one hidden layer, greedy cosine
  matching, no idf weighting by default (``BERTScorer(idf_corpus=...)`` turns it on), no baseline rescaling.
  Default: ``roberta-large``, layer 17, the package's default for English (and so the paper's).
- Rewards: ``caption_similarity`` (any captioner + BERTScore; the tiny-shapes captioner by default, so it
  runs offline), ``vlm_prompt_alignment`` (LLaVA + BERTScore recall: the paper's reward), and
  ``clip_score`` (cosine of CLIP's image and text embeddings, ×100 like torchmetrics' CLIPScore by default,
  not clipped at 0).

The name ``prompt_alignment`` stays the tiny-shapes attribute reward (``rewards/shapes.py``).

Why one file of ~420 lines: a reward is one module (the house rule), and these are one reward family,
prompt alignment: two of them are built from the same captioner protocol and BERTScorer, the third is the
CLIP-based alternative to them.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from diffusion_mdp.rewards import register_reward
from diffusion_mdp.rewards.aesthetic import (
    DEFAULT_CLIP_MODEL,
    RewardWeightsNotFoundError,
    clip_image_size,
    clip_preprocess,
    default_device,
    image_embeddings,
    load_clip,
    text_embeddings,
)

DEFAULT_VLM = "llava-hf/llava-1.5-7b-hf"
DEFAULT_QUESTION = "What is happening in this image?"
DEFAULT_BERTSCORE_MODEL = "roberta-large"
DEFAULT_BERTSCORE_LAYER = 17
# LLaVA-1.5's conversation format, used when the processor has no chat template.
LLAVA_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"

ScoreKind = Literal["recall", "precision", "f1"]


@runtime_checkable
class Captioner(Protocol):
    """Anything that describes images in words."""

    def caption(self, images: np.ndarray) -> list[str]:
        """One caption per image of a uint8 ``(B, H, W, 3)`` batch."""
        ...


def _from_pretrained(cls: Any, name: str | os.PathLike[str], what: str, files: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` from a folder, the cache, then the hub; a clear error naming the files if none."""
    error: Exception | None = None
    for local_only in (True, False):
        try:
            return cls.from_pretrained(os.fspath(name), local_files_only=local_only, **kwargs)
        except (OSError, ValueError) as exc:
            error = exc
    raise RewardWeightsNotFoundError(
        f"{what} {os.fspath(name)!r} is not a folder, not in the local Hugging Face cache, and could not be "
        f"downloaded ({type(error).__name__}: {str(error)[:200]}). It needs {files}. On a machine with access "
        f"run `huggingface-cli download {os.fspath(name)}` and copy ~/.cache/huggingface, or save it with "
        "save_pretrained(folder) and pass the folder."
    ) from error


# ------------------------------------------------------------------------------------------------
# BERTScore (the bert_score package)
# ------------------------------------------------------------------------------------------------
class _HiddenLayer(nn.Module):
    """An encoder seen through one hidden state: ``forward(...)[0]`` is ``hidden_states[layer]`` ``(B, L, D)``.

    ``bert_score`` truncates the encoder's layer list in place to pick a layer; wrapping leaves a module the
    caller passed untouched, and ``hidden_states[layer]`` is the output of the first ``layer`` layers.
    """

    def __init__(self, model: nn.Module, layer: int) -> None:
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Any) -> tuple[Tensor]:
        out = self.model(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return (out.hidden_states[self.layer],)


def _bert_score_utils() -> Any:
    try:
        from bert_score import utils
    except ImportError as exc:
        raise ImportError(
            'BERTScore needs the bert-score package: pip install "diffusion-mdp[rewards]" (or pip install bert-score)'
        ) from exc
    return utils


class BERTScorer:
    """BERTScore (Zhang et al., 2020) computed by the ``bert_score`` package, on any transformers encoder.

    ``score(candidates, references)`` equals ``bert_score.score(candidates, references, model_type=<model>,
    num_layers=layer)`` (``tests/test_real_scale_rewards.py`` checks it): layer ``layer``'s token embeddings,
    L2-normalised, greedy cosine matching in which [CLS]/[SEP] (<s>/</s>) take part but weigh 0 in the means,
    no baseline rescaling. This class only lets an already loaded encoder in and reuses it across calls.

    Args:
        model: Hub id or folder of an encoder (``AutoModel``), or an already loaded module.
        tokenizer: Its tokenizer (loaded from ``model`` when it is a name).
        layer: Which hidden state to use (0 = embeddings; 17 of 24 for roberta-large, BERTScore's default).
        device: Where the encoder runs.
        batch_size: Sentences per forward.
        idf_corpus: Sentences to compute idf weights from (e.g. the prompt set), with ``bert_score``'s
            ``get_idf_dict``: idf(w) = log((M + 1) / (df(w) + 1)) over M sentences. None (default): uniform
            weights (``idf=False``), as in the paper's reward.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | nn.Module = DEFAULT_BERTSCORE_MODEL,
        tokenizer: Any = None,
        layer: int = DEFAULT_BERTSCORE_LAYER,
        device: torch.device | str | None = None,
        batch_size: int = 64,
        idf_corpus: Sequence[str] | None = None,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        self._utils = _bert_score_utils()
        self.device = torch.device(device) if device is not None else default_device()
        if isinstance(model, nn.Module):
            if tokenizer is None:
                raise ValueError("pass tokenizer= with an encoder module")
            self.model = model
        else:
            files = "config.json, the weights (model.safetensors) and the tokenizer files"
            self.model = _from_pretrained(AutoModel, model, "BERTScore encoder", files)
            tokenizer = tokenizer or _from_pretrained(AutoTokenizer, model, "BERTScore tokenizer", files)
        self.tokenizer = tokenizer
        self.model = self.model.to(self.device).requires_grad_(False).eval()
        num_layers = int(getattr(self.model.config, "num_hidden_layers", layer))
        if not 0 <= layer <= num_layers:
            raise ValueError(f"layer={layer} but the encoder has hidden states 0..{num_layers}")
        self.layer = layer
        self.encoder = _HiddenLayer(self.model, layer)
        self.batch_size = batch_size
        self.idf: dict[int, float] | None = None
        if idf_corpus is not None:
            self.set_idf(idf_corpus)

    def set_idf(self, corpus: Sequence[str]) -> None:
        """idf weights of token ids from ``corpus`` (``bert_score.utils.get_idf_dict``; unseen: log(M + 1))."""
        self.idf = self._utils.get_idf_dict(list(corpus), self.tokenizer, nthreads=0)

    def _idf_dict(self) -> dict[int, float]:
        if self.idf is not None:
            return self.idf
        # bert_score.score(idf=False): every token weighs 1 except [CLS] and [SEP]
        idf: dict[int, float] = defaultdict(lambda: 1.0)
        idf[self.tokenizer.sep_token_id] = 0.0
        idf[self.tokenizer.cls_token_id] = 0.0
        return idf

    @torch.no_grad()
    def score(self, candidates: Sequence[str], references: Sequence[str]) -> dict[str, Tensor]:
        """P, R, F1 ``(B,)`` float32 of each candidate against its reference (``bert_score.score(cands, refs)``)."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
        if not candidates:
            return {key: torch.zeros(0) for key in ("precision", "recall", "f1")}
        prf = self._utils.bert_cos_score_idf(
            self.encoder,
            list(references),
            list(candidates),
            self.tokenizer,
            self._idf_dict(),
            batch_size=self.batch_size,
            device=self.device,
        )  # (B, 3): P, R, F
        prf = prf.float().cpu()
        return {"precision": prf[:, 0], "recall": prf[:, 1], "f1": prf[:, 2]}


# ------------------------------------------------------------------------------------------------
# Captioners
# ------------------------------------------------------------------------------------------------
class VLMCaptioner:
    """Captions from a transformers vision-language model (``AutoModelForImageTextToText`` + ``AutoProcessor``).

    Args:
        model: Hub id or folder (LLaVA-1.5 7B by default; the paper used LLaVA), or a loaded model.
        processor: Its processor (loaded from ``model`` when it is a name).
        question: What to ask about each image (the paper: "what is happening in this image?").
        prompt_template: Text around the image; ``{question}`` is substituted. None: the processor's chat
            template, or LLaVA-1.5's ``"USER: <image>\\n{question} ASSISTANT:"`` when it has none.
        max_new_tokens: Caption length limit (greedy decoding: the reward is deterministic).
        device, dtype: Where and in which precision the VLM runs (float16 on GPU is usual).
        batch_size: Images per ``generate`` call.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | nn.Module = DEFAULT_VLM,
        processor: Any = None,
        question: str = DEFAULT_QUESTION,
        prompt_template: str | None = None,
        max_new_tokens: int = 64,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = torch.device(device) if device is not None else default_device()
        if isinstance(model, nn.Module):
            if processor is None:
                raise ValueError("pass processor= with a model module")
            self.model = model
        else:
            files = "config.json, the weights, the tokenizer and preprocessor configs"
            self.model = _from_pretrained(AutoModelForImageTextToText, model, "VLM", files, dtype=dtype)
            processor = processor or _from_pretrained(AutoProcessor, model, "VLM processor", files)
        self.processor = processor
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # decoder-only generation: pad before the prompt, never after it
        self.model = self.model.to(self.device).requires_grad_(False).eval()
        self.question = question
        self.prompt = self._prompt(prompt_template)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def _prompt(self, template: str | None) -> str:
        if template is not None:
            return template.format(question=self.question)
        if getattr(self.processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return LLAVA_TEMPLATE.format(question=self.question)

    @torch.no_grad()
    def caption(self, images: np.ndarray) -> list[str]:
        """Greedy captions of uint8 ``(B, H, W, 3)`` images."""
        from PIL import Image

        captions: list[str] = []
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        for start in range(0, len(images), self.batch_size):
            batch = [Image.fromarray(np.asarray(img)) for img in images[start : start + self.batch_size]]
            inputs = self.processor(images=batch, text=[self.prompt] * len(batch), return_tensors="pt", padding=True)
            inputs = {
                k: v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in inputs.items()
            }
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            new_tokens = out[:, inputs["input_ids"].shape[1] :]  # decoder-only: drop the echoed prompt
            captions += [c.strip() for c in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        return captions


def tiny_shapes_captioner(device: torch.device | str = "cpu") -> Captioner:
    """The bundled tiny-shapes captioner (already a :class:`Captioner`)."""
    from diffusion_mdp.shapes.captioner import Captioner as ShapesCaptioner

    return ShapesCaptioner.load(device=device)


# ------------------------------------------------------------------------------------------------
# Rewards
# ------------------------------------------------------------------------------------------------
class CaptionSimilarity:
    """``reward = BERTScore(caption(image), prompt)``: recall (the paper), precision or F1.

    The caption is the candidate and the prompt the reference, so recall is the fraction of the prompt's
    meaning found in the caption. ``info`` holds all three scores; the captions are kept in
    :attr:`last_captions` for inspection (not in ``info``, whose values should be numbers).

    Args:
        captioner: Any :class:`Captioner`.
        scorer: A :class:`BERTScorer`.
        score: ``"recall"`` (default), ``"precision"`` or ``"f1"``.
    """

    def __init__(self, captioner: Captioner, scorer: BERTScorer, score: ScoreKind = "recall") -> None:
        if score not in ("recall", "precision", "f1"):
            raise ValueError(f"score must be recall, precision or f1, got {score!r}")
        if not isinstance(captioner, Captioner):
            raise TypeError(f"captioner must have caption(images) -> list[str], got {type(captioner).__name__}")
        self.captioner, self.scorer, self.score = captioner, scorer, score
        self.last_captions: list[str] = []

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        captions = self.captioner.caption(images)
        if len(captions) != len(prompts):
            raise ValueError(f"the captioner returned {len(captions)} captions for {len(prompts)} images")
        self.last_captions = list(captions)
        scores = self.scorer.score(captions, prompts)
        info = {key: value.double().numpy() for key, value in scores.items()}
        return info[self.score].copy(), info


@register_reward("caption_similarity")
def caption_similarity(
    captioner: Captioner | None = None,
    bertscore_model: str | os.PathLike[str] | nn.Module = DEFAULT_BERTSCORE_MODEL,
    bertscore_tokenizer: Any = None,
    bertscore_layer: int = DEFAULT_BERTSCORE_LAYER,
    score: ScoreKind = "recall",
    device: torch.device | str | None = None,
    idf_corpus: Sequence[str] | None = None,
) -> CaptionSimilarity:
    """BERTScore between any captioner's captions and the prompts (default captioner: tiny-shapes')."""
    device = torch.device(device) if device is not None else default_device()
    captioner = captioner if captioner is not None else tiny_shapes_captioner(device)
    scorer = BERTScorer(bertscore_model, bertscore_tokenizer, bertscore_layer, device, idf_corpus=idf_corpus)
    return CaptionSimilarity(captioner, scorer, score)


@register_reward("vlm_prompt_alignment")
def vlm_prompt_alignment(
    vlm: str | os.PathLike[str] | nn.Module = DEFAULT_VLM,
    vlm_processor: Any = None,
    question: str = DEFAULT_QUESTION,
    prompt_template: str | None = None,
    max_new_tokens: int = 64,
    bertscore_model: str | os.PathLike[str] | nn.Module = DEFAULT_BERTSCORE_MODEL,
    bertscore_tokenizer: Any = None,
    bertscore_layer: int = DEFAULT_BERTSCORE_LAYER,
    score: ScoreKind = "recall",
    device: torch.device | str | None = None,
    idf_corpus: Sequence[str] | None = None,
    vlm_dtype: torch.dtype | None = None,
) -> CaptionSimilarity:
    """The paper's prompt-alignment reward: VLM caption (LLaVA), BERTScore recall against the prompt."""
    device = torch.device(device) if device is not None else default_device()
    dtype = vlm_dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    captioner = VLMCaptioner(vlm, vlm_processor, question, prompt_template, max_new_tokens, device, dtype)
    scorer = BERTScorer(bertscore_model, bertscore_tokenizer, bertscore_layer, device, idf_corpus=idf_corpus)
    return CaptionSimilarity(captioner, scorer, score)


class CLIPScore:
    """``reward = scale · cos(CLIP image embedding, CLIP text embedding of the prompt)``.

    Args:
        clip_model: Hub id, folder or ``CLIPModel``.
        tokenizer: Its tokenizer (``CLIPTokenizer``; loaded from ``clip_model`` when it is a name).
        scale: Multiplier (100: the CLIPScore convention of torchmetrics, without its clamp at 0; 1: raw cosine).
        device, dtype: Where and in which precision CLIP runs.
    """

    def __init__(
        self,
        clip_model: str | os.PathLike[str] | nn.Module = DEFAULT_CLIP_MODEL,
        tokenizer: Any = None,
        scale: float = 100.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import CLIPTokenizer

        self.device = torch.device(device) if device is not None else default_device()
        if tokenizer is None:
            if isinstance(clip_model, nn.Module):
                raise ValueError("pass tokenizer= with a CLIPModel module")
            tokenizer = _from_pretrained(CLIPTokenizer, clip_model, "CLIP tokenizer", "vocab.json and merges.txt")
        self.clip = load_clip(clip_model, self.device, dtype, purpose="clip_score")
        self.tokenizer, self.scale, self.dtype = tokenizer, float(scale), dtype
        self.image_size = clip_image_size(self.clip)

    @torch.no_grad()
    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        pixels = clip_preprocess(images, self.image_size, device=self.device).to(self.dtype)
        image = nn.functional.normalize(image_embeddings(self.clip, pixels).float(), dim=-1)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        text = nn.functional.normalize(
            text_embeddings(self.clip, tokens["input_ids"], tokens["attention_mask"]).float(), dim=-1
        )
        cosine = (image * text).sum(-1).double().cpu().numpy()
        return self.scale * cosine, {"cosine": cosine}


@register_reward("clip_score")
def clip_score(
    clip_model: str | os.PathLike[str] | nn.Module = DEFAULT_CLIP_MODEL,
    tokenizer: Any = None,
    scale: float = 100.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> CLIPScore:
    """CLIP image-text cosine ×``scale``; see :class:`CLIPScore`."""
    return CLIPScore(clip_model, tokenizer, scale, device, dtype)


__all__ = [
    "BERTScorer",
    "CLIPScore",
    "CaptionSimilarity",
    "Captioner",
    "VLMCaptioner",
    "tiny_shapes_captioner",
]
