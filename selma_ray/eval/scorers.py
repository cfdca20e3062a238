"""Image scorers behind one small interface, and the Ray Data UDF that runs any of them.

A scorer is built once per actor and called on a batch: ``score(images, prompts, questions)``
returns one float per image (higher is better). Model ids come from ``eval`` config; built-in
names such as ``tiny-clip`` resolve to tiny local models (``selma_ray.models``).

- ``clip``: CLIPScore, 100 * max(cos(image, text), 0) with a transformers CLIPModel.
- ``pick``: PickScore, exp(logit_scale) * cos(image, text) with the PickScore CLIP weights
  and the processor of the CLIP-H model it was fine-tuned from.
- ``dsg``: DSG faithfulness: a VQA model answers each yes/no question of the prompt, children
  of a question answered wrongly score 0, and the score is the share of questions that score
  1 (``selma_ray.eval.dsg``).
- ``tifa``: TIFA faithfulness: a VQA model answers each multiple-choice question; the score
  is the share answered correctly.

The VQA scorers answer in one of two modes (``eval.vqa_mode``):

- ``generate`` (the published protocols): the model generates a free-form answer, which is
  normalised and judged (``dsg.judge_answer``): DSG counts it right when it reads "yes", TIFA
  maps it to the nearest choice and compares with the answer key.
- ``rank``: the choice with the highest likelihood under the model is the answer (no
  free-form text; BLIP VQA and image-text-to-text models).
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
from selma_ray.eval.dsg import Question, dsg_score, judge_answer, tifa_score

log = logging.getLogger(__name__)
VQA_SCORERS = ("dsg", "tifa")
VQA_MODES = ("generate", "rank")
# longest generated answer, in tokens: VQA answers are a word or a few
MAX_ANSWER_TOKENS = 16

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
    """A BLIP VQA model (``BlipForQuestionAnswering``): generates answers with its answer
    decoder, or ranks each choice's log-likelihood under it.

    The answer decoder's cross-attention ignores the question's padding mask (transformers
    5.19 drops ``encoder_attention_mask`` in ``BlipTextAttention``), so a question padded to a
    longer one in its batch would get another answer. Questions are therefore batched only
    with questions of the same token length: an answer does not depend on its batch."""

    def __init__(self, model: str, device: str = "cpu"):
        from transformers import AutoProcessor, BlipForQuestionAnswering

        from selma_ray.models import resolve

        self.device = device
        self.model = BlipForQuestionAnswering.from_pretrained(resolve(model)).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(resolve(model))
        self.tokenizer = self.processor.tokenizer

    def _questions(self, images: list[Any], questions: list[str]):
        """The processor's inputs and the text encoder's states of each question about its
        image (the decoder attends to them, masked where the question is padding)."""
        import torch

        inputs = self.processor(
            images=images, text=questions, return_tensors="pt", padding=True, truncation=True
        ).to(self.device)
        model = self.model
        vision = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        states = model.text_encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            encoder_hidden_states=vision,
            encoder_attention_mask=torch.ones(vision.shape[:-1], dtype=torch.long).to(self.device),
        ).last_hidden_state
        return inputs, states

    def same_length(self, questions: list[str]) -> list[list[int]]:
        """Indices of ``questions`` grouped by token length (batches that need no padding)."""
        groups: dict[int, list[int]] = {}
        for i, q in enumerate(questions):
            n = len(self.tokenizer(q, truncation=True).input_ids)
            groups.setdefault(n, []).append(i)
        return list(groups.values())

    def generate_answers(
        self, images: list[Any], questions: list[str], choices: list[tuple[str, ...]], **_: Any
    ) -> list[str]:
        """Each (image, question) pair's answer, generated greedily by the answer decoder
        (the question alone is asked, as in TIFA's BLIP wrapper; ``choices`` are not shown)."""
        out = [""] * len(questions)
        for idx in self.same_length(questions):
            answers = self._generate([images[i] for i in idx], [questions[i] for i in idx])
            for i, a in zip(idx, answers, strict=True):
                out[i] = a
        return out

    def _generate(self, images: list[Any], questions: list[str]) -> list[str]:
        """What ``BlipForQuestionAnswering.generate`` does, for questions of one length."""
        import torch

        model, tok = self.model, self.tokenizer
        with torch.no_grad():
            inputs, states = self._questions(images, questions)
            start = torch.full(
                (states.shape[0], 1), model.decoder_start_token_id, device=states.device
            )
            out = model.text_decoder.generate(
                input_ids=start,
                eos_token_id=model.config.text_config.sep_token_id,
                pad_token_id=model.config.text_config.pad_token_id,
                encoder_hidden_states=states,
                encoder_attention_mask=inputs["attention_mask"],
                max_new_tokens=MAX_ANSWER_TOKENS,
                do_sample=False,
            ).cpu()
        # without the decoder's start token, a plain word in some vocabularies
        return [t.strip() for t in tok.batch_decode(out[:, 1:], skip_special_tokens=True)]

    def choice_logprobs(
        self, images: list[Any], questions: list[str], choices: list[tuple[str, ...]]
    ) -> list[list[float]]:
        """For each (image, question) pair, the summed log-probability of each choice."""
        out: list[list[float]] = [[] for _ in questions]
        for idx in self.same_length(questions):
            got = self._choice_logprobs(
                [images[i] for i in idx], [questions[i] for i in idx], [choices[i] for i in idx]
            )
            for i, lp in zip(idx, got, strict=True):
                out[i] = lp
        return out

    def _choice_logprobs(
        self, images: list[Any], questions: list[str], choices: list[tuple[str, ...]]
    ) -> list[list[float]]:
        import torch

        tok, model = self.tokenizer, self.model
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
            inputs, question = self._questions(images, questions)
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


def _ask(question: str, options: tuple[str, ...]) -> str:
    return f"{question} Answer with one of: {', '.join(options)}."


class VLMVQA:
    """Any transformers image-text-to-text model (LLaVA, Qwen-VL, PaliGemma, ...), asked in its
    chat format to answer with one of the choices: generates the answer, or ranks each
    choice's log-likelihood after the chat prompt."""

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

    def _chat(self, question: str, options: tuple[str, ...]) -> str:
        content = [{"type": "image"}, {"type": "text", "text": _ask(question, options)}]
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def generate_answers(
        self, images: list[Any], questions: list[str], choices: list[tuple[str, ...]], **_: Any
    ) -> list[str]:
        """Each (image, question) pair's answer, generated greedily after the chat prompt."""
        import torch

        tok = self.processor.tokenizer
        prompts = [self._chat(q, c) for q, c in zip(questions, choices, strict=True)]
        tok.padding_side = "left"  # a batch generates from the same position
        try:
            inputs = self.processor(
                text=prompts, images=images, return_tensors="pt", padding=True
            ).to(self.device)
        finally:
            tok.padding_side = "right"
        with torch.no_grad():
            out = self.model.generate(
                **inputs, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False
            ).cpu()
        new = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]

    def choice_logprobs(
        self, images: list[Any], questions: list[str], choices: list[tuple[str, ...]]
    ) -> list[list[float]]:
        import torch

        out = []
        for image, question, options in zip(images, questions, choices, strict=True):
            prompt = self._chat(question, options)
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


class Blip2VQA:
    """A BLIP-2 model (``Blip2ForConditionalGeneration``, OPT or Flan-T5 language model):
    generates answers to ``Question: ... Answer:`` prompts (``vqa_mode=generate`` only).
    Multiple-choice questions list their options as SELMA's TIFA code does for BLIP-2:
    ``Question: {q} Options: {a, b, c} Answer:``."""

    def __init__(self, model: str, device: str = "cpu"):
        from transformers import AutoProcessor, Blip2ForConditionalGeneration

        from selma_ray.models import resolve

        self.device = device
        dtype = "auto" if device == "cuda" else None
        self.model = (
            Blip2ForConditionalGeneration.from_pretrained(resolve(model), dtype=dtype)
            .to(device)
            .eval()
        )
        self.processor = AutoProcessor.from_pretrained(resolve(model))
        self.encoder_decoder = bool(self.model.config.text_config.is_encoder_decoder)
        # a decoder-only language model continues the prompt: batches pad on the left
        self.processor.tokenizer.padding_side = "right" if self.encoder_decoder else "left"

    @staticmethod
    def prompt(question: str, options: tuple[str, ...], list_choices: bool) -> str:
        if list_choices:
            return f"Question: {question} Options: {', '.join(options)} Answer:"
        return f"Question: {question} Answer:"

    def generate_answers(
        self,
        images: list[Any],
        questions: list[str],
        choices: list[tuple[str, ...]],
        list_choices: bool = False,
    ) -> list[str]:
        import torch

        texts = [self.prompt(q, c, list_choices) for q, c in zip(questions, choices, strict=True)]
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.no_grad():
            out = self.model.generate(
                **inputs, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False
            ).cpu()
        ids = inputs["input_ids"].cpu()
        n = ids.shape[1]
        if not self.encoder_decoder and out.shape[1] >= n and bool((out[:, :n] == ids).all()):
            out = out[:, n:]  # the prompt comes back in front of the answer
        tok = self.processor.tokenizer
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


def make_vqa(model: str, device: str = "cpu"):
    """BLIP VQA models get the BLIP answer decoder, BLIP-2 models their language model; any
    other model id is loaded as an image-text-to-text VLM."""
    from transformers import AutoConfig

    from selma_ray.models import resolve

    kind = AutoConfig.from_pretrained(resolve(model)).model_type
    if kind == "blip":
        return BlipVQA(model, device)
    if kind == "blip-2":
        return Blip2VQA(model, device)
    return VLMVQA(model, device)


class VQAScore:
    """Faithfulness from a VQA model's answers to each image's questions.

    ``protocol="dsg"``: dependency-zeroed share of questions that score 1; yes/no questions are
    right when the generated answer reads "yes" (``dsg.judge_answer``). ``protocol="tifa"``:
    share of multiple-choice questions answered correctly, a generated answer mapped to its
    nearest choice. An image without questions (``None``) scores NaN: it is not this scorer's.
    """

    protocol = "dsg"

    def __init__(self, model: str, device: str = "cpu", mode: str = "rank"):
        if mode not in VQA_MODES:
            raise ValueError(f"vqa mode {mode!r}: choose from {list(VQA_MODES)}")
        self.vqa = make_vqa(model, device)
        self.mode = mode
        if mode == "rank" and not hasattr(self.vqa, "choice_logprobs"):
            raise ValueError(
                f"eval.vqa_mode=rank needs a BLIP VQA or image-text-to-text model; {model!r} "
                f"({type(self.vqa).__name__}) only generates: set eval.vqa_mode=generate"
            )
        self.last_details: list[list[dict[str, Any]]] = []

    def _answers(self, images: list[Any], flat: list[Question]) -> list[tuple[str, str]]:
        """(answer as judged, generated text or "" when ranked) per question."""
        if not flat:
            return []
        texts = [q.question for q in flat]
        choices = [q.choices for q in flat]
        if self.mode == "rank":
            logps = self.vqa.choice_logprobs(images, texts, choices)
            return [
                (q.choices[max(range(len(lp)), key=lp.__getitem__)], "")
                for q, lp in zip(flat, logps, strict=True)
            ]
        tifa = self.protocol == "tifa"
        generated = self.vqa.generate_answers(images, texts, choices, list_choices=tifa)
        return [
            (judge_answer(q, g, nearest=True if tifa else None), g)
            for q, g in zip(flat, generated, strict=True)
        ]

    def score(
        self, images: list[Any], prompts: list[str], questions: list[list[Question] | None]
    ) -> list[float]:
        flat = [(i, q) for i, qs in enumerate(questions) for q in qs or ()]
        answers = self._answers([images[i] for i, _ in flat], [q for _, q in flat])
        correct: list[dict[str, bool]] = [{} for _ in images]
        details: list[list[dict[str, Any]]] = [[] for _ in images]
        for (i, q), (picked, generated) in zip(flat, answers, strict=True):
            correct[i][q.id] = picked == q.answer
            detail = {"id": q.id, "answer": picked, "correct": picked == q.answer}
            if self.mode == "generate":
                detail["generated"] = generated
            details[i].append(detail)
        self.last_details = details
        return [
            float("nan") if qs is None else self.item_score(qs, c)
            for qs, c in zip(questions, correct, strict=True)
        ]

    def item_score(self, questions: list[Question], correct: dict[str, bool]) -> float:
        return dsg_score(questions, correct)[0]


class DSGScore(VQAScore):
    """DSG (Cho et al. 2024): yes/no questions with dependency zeroing."""

    protocol = "dsg"


class TIFAScore(VQAScore):
    """TIFA (Hu et al. 2023): multiple-choice accuracy, no dependencies."""

    protocol = "tifa"

    def item_score(self, questions: list[Question], correct: dict[str, bool]) -> float:
        return tifa_score(questions, correct)


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
        "dsg": {"vqa_model": ec.vqa_model, "vqa_mode": ec.vqa_mode},
        "tifa": {"vqa_model": ec.tifa_vqa_model or ec.vqa_model, "vqa_mode": ec.vqa_mode},
        "image_reward": {"model": ec.image_reward_model},
        "hps": {"version": ec.hps_version},
    }[name]


def build_scorer(name: str, ids: dict[str, str], device: str = "cpu"):
    if name == "clip":
        return ClipScore(ids["model"], device=device)
    if name == "pick":
        return PickScore(ids["model"], ids["processor"], device=device)
    if name in VQA_SCORERS:
        cls = DSGScore if name == "dsg" else TIFAScore
        return cls(ids["vqa_model"], device=device, mode=ids.get("vqa_mode", "rank"))
    if name == "image_reward":
        return ImageRewardScore(ids["model"], device=device)
    if name == "hps":
        return HPSScore(ids["version"], device=device)
    raise ValueError(f"unknown scorer {name!r}; choose from {sorted(LABELS)}")


def decode_png(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


class ScoreBatch:
    """Ray Data UDF: adds column ``score_<name>`` (and ``<name>_detail`` for the VQA scorers
    dsg and tifa) to a batch with columns ``image`` (PNG bytes) and ``prompt``. The VQA
    scorers take each row's questions from ``questions`` (prompt id -> question dicts; a
    prompt not in it scores NaN) or, without it, from a ``questions`` column (JSON)."""

    def __init__(
        self,
        name: str,
        ids: dict[str, str],
        num_gpus: float = 0.0,
        questions: dict[str, list[dict[str, Any]]] | None = None,
    ):
        from selma_ray.core.logs import setup_logging

        setup_logging()
        self.name = name
        self.scorer = build_scorer(name, ids, _device(num_gpus))
        self.questions = (
            None
            if questions is None
            else {pid: [Question.from_dict(q) for q in qs] for pid, qs in questions.items()}
        )
        log.info("eval: scorer %s loaded (%s)", LABELS[name], ids)

    def _row_questions(self, batch: dict[str, Any]) -> list[list[Question] | None]:
        if self.questions is not None:
            return [self.questions.get(str(pid)) for pid in batch["prompt_id"]]
        out = []
        for s in batch["questions"]:
            parsed = json.loads(s) if s is not None else None
            out.append(None if parsed is None else [Question.from_dict(q) for q in parsed])
        return out

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        vqa = self.name in VQA_SCORERS
        needed = ["image", "prompt"]
        if vqa:
            needed.append("prompt_id" if self.questions is not None else "questions")
        require_columns(f"ScoreBatch({self.name})", batch, needed)
        n = len(batch["prompt"])
        prompts = [str(p) for p in batch["prompt"]]
        if not vqa:
            images = [decode_png(b) for b in batch["image"]]
            batch[f"score_{self.name}"] = np.asarray(
                self.scorer.score(images, prompts), dtype=np.float64
            )
            return batch
        # only rows with questions are this scorer's (DSG-1K prompts for dsg, TIFA for tifa)
        questions = self._row_questions(batch)
        mine = [i for i in range(n) if questions[i] is not None]
        scores = np.full(n, np.nan, dtype=np.float64)
        details: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        if mine:
            got = self.scorer.score(
                [decode_png(batch["image"][i]) for i in mine],
                [prompts[i] for i in mine],
                [questions[i] for i in mine],
            )
            for i, value, detail in zip(mine, got, self.scorer.last_details, strict=True):
                scores[i], details[i] = value, detail
        batch[f"score_{self.name}"] = scores
        batch[f"{self.name}_detail"] = np.array([json.dumps(d) for d in details], dtype=object)
        return batch
