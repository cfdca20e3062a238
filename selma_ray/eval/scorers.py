"""Image scorers behind one small interface, and the Ray Data UDF that runs any of them.

A scorer is built once per actor and called on a batch: ``score(images, prompts, questions)``
returns one float per image (higher is better). Model ids come from ``eval`` config; built-in
names such as ``tiny-clip`` resolve to tiny local models (``selma_ray.models``).

- ``clip``: CLIPScore, 100 * max(cos(image, text), 0) with a transformers CLIPModel.
- ``pick``: PickScore, exp(logit_scale) * cos(image, text) with the PickScore CLIP weights
  and the processor of the CLIP-H model it was fine-tuned from.
- ``dsg``: DSG-style faithfulness: a VQA model answers each question of the prompt (the choice
  with the highest likelihood), children of a question answered wrongly score 0, and the
  score is the share of questions answered correctly (``selma_ray.eval.dsg``).
- ``image_reward``, ``hps``: optional extras, used only where their packages import.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
from typing import Any

from selma_ray.core.udf import require_columns
from selma_ray.eval import LABELS  # the scorer registry
from selma_ray.eval.dsg import Question, dsg_score

log = logging.getLogger(__name__)

_EXTRAS = {
    "image_reward": ("ImageReward", "image-reward"),
    "hps": ("hpsv2", "hpsv2"),
}


def unavailable(name: str) -> str | None:
    """Why scorer ``name`` cannot run here, or None when it can."""
    if name not in _EXTRAS:
        return None
    module, package = _EXTRAS[name]
    if importlib.util.find_spec(module) is None:
        return (
            f"package {package!r} is not installed (pip's plan for it replaces the pinned "
            f"torch with a CUDA build, so it is not part of the CPU setup; install it on a GPU "
            f"machine that can download its weights)"
        )
    return None


def _device(num_gpus: float) -> str:
    from selma_ray.core.devices import use_cuda

    return "cuda" if use_cuda(num_gpus) else "cpu"


class ClipScore:
    """CLIPScore (Hessel et al. 2021 without the 2.5 weight): 100 * max(cosine, 0)."""

    def __init__(self, model: str, processor: str | None = None, device: str = "cpu"):
        from transformers import AutoProcessor, CLIPModel

        from selma_ray.models import resolve

        self.device = device
        self.model = CLIPModel.from_pretrained(resolve(model)).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(resolve(processor or model))

    def cosine(self, images: list[Any], prompts: list[str]):
        import torch

        inputs = self.processor(
            text=prompts, images=images, return_tensors="pt", padding=True, truncation=True
        ).to(self.device)
        with torch.no_grad():
            img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            txt = self.model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            )
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        img = torch.nn.functional.normalize(img.float(), dim=-1)
        txt = torch.nn.functional.normalize(txt.float(), dim=-1)
        return (img * txt).sum(-1).cpu()

    def score(self, images: list[Any], prompts: list[str], questions: Any = None) -> list[float]:
        return (100 * self.cosine(images, prompts).clamp(min=0)).tolist()


class PickScore(ClipScore):
    """PickScore (Kirstain et al. 2023): the model's logit scale times the cosine."""

    def score(self, images: list[Any], prompts: list[str], questions: Any = None) -> list[float]:
        scale = self.model.logit_scale.exp().item()
        return (scale * self.cosine(images, prompts)).tolist()


class BlipVQA:
    """Answers multiple-choice questions (yes/no included) with a BLIP VQA model by ranking
    each choice's log-likelihood under the answer decoder."""

    def __init__(self, model: str, device: str = "cpu"):
        from transformers import AutoProcessor, BlipForQuestionAnswering

        from selma_ray.models import resolve

        self.device = device
        self.model = BlipForQuestionAnswering.from_pretrained(resolve(model)).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(resolve(model))
        self.tokenizer = self.processor.tokenizer

    def choice_logprobs(
        self, images: list[Any], questions: list[str], choices: list[tuple[str, ...]]
    ) -> list[list[float]]:
        """For each (image, question) pair, the summed log-probability of each choice."""
        import torch

        tok, model = self.tokenizer, self.model
        inputs = self.processor(
            images=images, text=questions, return_tensors="pt", padding=True, truncation=True
        ).to(self.device)
        pairs = [(i, c) for i, cs in enumerate(choices) for c in cs]
        answers = [
            [model.decoder_start_token_id, *tok(c, add_special_tokens=False).input_ids]
            + [tok.sep_token_id]
            for _, c in pairs
        ]
        width = max(map(len, answers))
        dec = torch.full((len(pairs), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(dec)
        for j, ids in enumerate(answers):
            dec[j, : len(ids)] = torch.tensor(ids)
            mask[j, : len(ids)] = 1
        rows = torch.tensor([i for i, _ in pairs])
        with torch.no_grad():
            vision = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
            question = model.text_encoder(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                encoder_hidden_states=vision,
                encoder_attention_mask=torch.ones(vision.shape[:-1], dtype=torch.long).to(
                    self.device
                ),
            ).last_hidden_state
            logits = model.text_decoder(
                input_ids=dec.to(self.device),
                attention_mask=mask.to(self.device),
                encoder_hidden_states=question[rows],
                encoder_attention_mask=inputs["attention_mask"][rows],
            ).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()
        target = dec[:, 1:]
        token_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask[:, 1:]
        totals = token_lp.sum(-1).tolist()
        out: list[list[float]] = [[] for _ in choices]
        for (i, _), total in zip(pairs, totals, strict=True):
            out[i].append(total)
        return out


class VLMVQA:
    """Answers multiple-choice questions with any transformers image-text-to-text model (LLaVA,
    Qwen-VL, PaliGemma, ...) by ranking each choice's log-likelihood after the chat prompt."""

    def __init__(self, model: str, device: str = "cpu"):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from selma_ray.models import resolve

        self.device = device
        dtype = "auto" if device == "cuda" else None
        self.model = (
            AutoModelForImageTextToText.from_pretrained(resolve(model), dtype=dtype)
            .to(device)
            .eval()
        )
        self.processor = AutoProcessor.from_pretrained(resolve(model))
        self.processor.tokenizer.padding_side = "right"  # prompts line up at the start

    def choice_logprobs(
        self, images: list[Any], questions: list[str], choices: list[tuple[str, ...]]
    ) -> list[list[float]]:
        import torch

        out = []
        for image, question, options in zip(images, questions, choices, strict=True):
            ask = f"{question} Answer with one of: {', '.join(options)}."
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ask}]}
            ]
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            n_prompt = self.processor(text=[prompt], images=[image], return_tensors="pt")[
                "input_ids"
            ].shape[1]
            inputs = self.processor(
                text=[prompt + c for c in options],
                images=[image] * len(options),
                return_tensors="pt",
                padding=True,
            ).to(self.device)
            with torch.no_grad():
                logits = self.model(**inputs).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()
            target = inputs["input_ids"][:, 1:].cpu()
            mask = inputs["attention_mask"][:, 1:].cpu().clone()
            mask[:, : n_prompt - 1] = 0  # score only the answer's tokens
            token_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask
            out.append(token_lp.sum(-1).tolist())
        return out


def make_vqa(model: str, device: str = "cpu"):
    """BLIP VQA models get the BLIP answer decoder; any other model id is loaded as a VLM."""
    from transformers import AutoConfig

    from selma_ray.models import resolve

    kind = AutoConfig.from_pretrained(resolve(model)).model_type
    return BlipVQA(model, device) if kind == "blip" else VLMVQA(model, device)


class DSGScore:
    """DSG/TIFA-style faithfulness from the VQA answers to each prompt's questions."""

    def __init__(self, model: str, device: str = "cpu"):
        self.vqa = make_vqa(model, device)
        self.last_details: list[list[dict[str, Any]]] = []

    def score(
        self, images: list[Any], prompts: list[str], questions: list[list[Question]]
    ) -> list[float]:
        flat = [(i, q) for i, qs in enumerate(questions) for q in qs]
        logps = (
            self.vqa.choice_logprobs(
                [images[i] for i, _ in flat],
                [q.question for _, q in flat],
                [q.choices for _, q in flat],
            )
            if flat
            else []
        )
        correct: list[dict[str, bool]] = [{} for _ in images]
        details: list[list[dict[str, Any]]] = [[] for _ in images]
        for (i, q), lp in zip(flat, logps, strict=True):
            picked = q.choices[max(range(len(lp)), key=lp.__getitem__)]
            correct[i][q.id] = picked == q.answer
            details[i].append({"id": q.id, "answer": picked, "correct": picked == q.answer})
        self.last_details = details
        return [dsg_score(qs, c)[0] for qs, c in zip(questions, correct, strict=True)]


class ImageRewardScore:
    def __init__(self, model: str, device: str = "cpu"):
        import ImageReward

        self.model = ImageReward.load(model, device=device)

    def score(self, images: list[Any], prompts: list[str], questions: Any = None) -> list[float]:
        return [float(self.model.score(p, img)) for img, p in zip(images, prompts, strict=True)]


class HPSScore:
    def __init__(self, version: str, device: str = "cpu"):
        import hpsv2

        self.hpsv2, self.version = hpsv2, version

    def score(self, images: list[Any], prompts: list[str], questions: Any = None) -> list[float]:
        return [
            float(self.hpsv2.score([img], p, hps_version=self.version)[0])
            for img, p in zip(images, prompts, strict=True)
        ]


def model_ids(name: str, ec: Any) -> dict[str, str]:
    """The model ids scorer ``name`` uses under eval config ``ec`` (for reports)."""
    return {
        "clip": {"model": ec.clip_model},
        "pick": {"model": ec.pick_model, "processor": ec.pick_processor},
        "dsg": {"vqa_model": ec.vqa_model},
        "image_reward": {"model": ec.image_reward_model},
        "hps": {"version": ec.hps_version},
    }[name]


def build_scorer(name: str, ids: dict[str, str], device: str = "cpu"):
    if name == "clip":
        return ClipScore(ids["model"], device=device)
    if name == "pick":
        return PickScore(ids["model"], ids["processor"], device=device)
    if name == "dsg":
        return DSGScore(ids["vqa_model"], device=device)
    if name == "image_reward":
        return ImageRewardScore(ids["model"], device=device)
    if name == "hps":
        return HPSScore(ids["version"], device=device)
    raise ValueError(f"unknown scorer {name!r}; choose from {sorted(LABELS)}")


def decode_png(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


class ScoreBatch:
    """Ray Data UDF: adds column ``score_<name>`` (and ``dsg_detail`` for dsg) to a batch
    with columns ``image`` (PNG bytes), ``prompt`` and, for dsg, ``questions`` (JSON)."""

    def __init__(self, name: str, ids: dict[str, str], num_gpus: float = 0.0):
        from selma_ray.core.logs import setup_logging

        setup_logging()
        self.name = name
        self.scorer = build_scorer(name, ids, _device(num_gpus))
        log.info("eval: scorer %s loaded (%s)", LABELS[name], ids)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        needed = ["image", "prompt"] + (["questions"] if self.name == "dsg" else [])
        require_columns(f"ScoreBatch({self.name})", batch, needed)
        images = [decode_png(b) for b in batch["image"]]
        prompts = [str(p) for p in batch["prompt"]]
        questions = None
        if self.name == "dsg":
            questions = [[Question.from_dict(q) for q in json.loads(s)] for s in batch["questions"]]
        scores = self.scorer.score(images, prompts, questions)
        batch[f"score_{self.name}"] = np.asarray(scores, dtype=np.float64)
        if self.name == "dsg":
            details = [json.dumps(d) for d in self.scorer.last_details]
            batch["dsg_detail"] = np.array(details, dtype=object)
        return batch
