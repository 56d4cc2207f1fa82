"""BLIP visual question answering (transformers' `BlipForQuestionAnswering`).

The forward pass has three stages, each exposed so the patching engine can start
from any of them:

    pixel_values ──vision──▶ image_states [B, I, D]          (I = patches + 1)
    input_ids + image_states ──text encoder (cross-attn)──▶ question_states [B, T, D]
    [DEC] + question_states ──answer decoder (cross-attn)──▶ logits [B, V]

The quantity every patching metric uses is the answer decoder's first-step logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from notice.errors import NoticeError
from notice.models.base import StreamFacts, resolve_dtype

ANSWER_SCORING = ("first_token", "sequence")


@dataclass
class BlipInputs:
    """Processor output for one batch: equal-length questions, so no padding is involved."""

    pixel_values: torch.Tensor  # [B, 3, H, W]
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]


class BlipAdapter:
    """Loading, inputs, answer logits and model facts for BLIP VQA checkpoints."""

    family = "blip"

    def __init__(self, model, processor, name: str):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.name = name
        config = model.config
        vision, text = config.vision_config, config.text_config
        self.bos_token_id = int(text.bos_token_id)
        self.sep_token_id = int(text.sep_token_id)
        grid = vision.image_size // vision.patch_size
        self.num_patches = grid * grid
        self.num_image_tokens = self.num_patches + 1  # [CLS] + patches
        self.streams = {
            "vision": StreamFacts("vision", vision.num_hidden_layers, vision.num_attention_heads,
                                  vision.hidden_size // vision.num_attention_heads, vision.hidden_size,
                                  ("layer", "self_attn", "mlp"), "patch",
                                  f"ViT image encoder over {self.num_image_tokens} tokens ([CLS] + {grid}x{grid} patches)"),
            "text": StreamFacts("text", text.num_hidden_layers, text.num_attention_heads,
                                text.hidden_size // text.num_attention_heads, text.hidden_size,
                                ("layer", "self_attn", "cross_attn", "mlp"), "token",
                                "question encoder; cross-attends the image tokens"),
            "decoder": StreamFacts("decoder", text.num_hidden_layers, text.num_attention_heads,
                                   text.hidden_size // text.num_attention_heads, text.hidden_size,
                                   ("layer", "self_attn", "cross_attn", "mlp"), "answer",
                                   "answer decoder; cross-attends the question tokens"),
        }

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, source: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32",
                        name: str | None = None) -> "BlipAdapter":
        from transformers import BlipForQuestionAnswering, BlipProcessor

        model = BlipForQuestionAnswering.from_pretrained(str(source), dtype=resolve_dtype(dtype))
        processor = BlipProcessor.from_pretrained(str(source))
        return cls(model.to(device), processor, name or str(source))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ----------------------------------------------------------------- inputs
    def prepare(self, images: Sequence[Image.Image], questions: Sequence[str]) -> BlipInputs:
        """Processor inputs for one batch; the questions must tokenize to one length."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        for question in questions:
            if not question or not question.strip():
                raise NoticeError("empty question: ask something about the image, e.g. \"what color is the shape?\"")
        encoded = self.processor(images=list(images), text=list(questions), return_tensors="pt", padding=True)
        if not bool(encoded["attention_mask"].all()):
            raise ValueError("questions of one batch must have the same token length; use batches_by_length")
        return BlipInputs(encoded["pixel_values"].to(self.device, self.dtype),
                          encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device))

    def tokenize(self, text: str) -> list[str]:
        """Wordpieces of the question as the text encoder sees them, [CLS] and [SEP] included."""
        ids = self.tokenizer(text)["input_ids"]
        return self.tokenizer.convert_ids_to_tokens(ids)

    def token_length(self, question: str) -> int:
        return len(self.tokenizer(question)["input_ids"])

    def answer_token_ids(self, answer: str) -> list[int]:
        """Wordpiece ids of an answer, without [CLS]/[SEP]."""
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise NoticeError(f"answer {answer!r} has no tokens: give a non-empty answer word")
        return ids

    # ----------------------------------------------------------------- stages
    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings before the first vision layer, [B, I, D]."""
        return self.model.vision_model.embeddings(pixel_values)

    def encode_image(self, pixel_values: torch.Tensor | None = None,
                     image_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 3, H, W] (or its embeddings, e.g. with noise added) → image_states [B, I, D]."""
        vision = self.model.vision_model
        if image_embeddings is None:
            image_embeddings = self.embed_image(pixel_values)
        return vision.post_layernorm(vision.encoder(inputs_embeds=image_embeddings).last_hidden_state)

    def embed_question(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word + position embeddings (after their LayerNorm) before the first text layer, [B, T, D]."""
        return self.model.text_encoder.embeddings(input_ids=input_ids)

    def encode_question(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
                        image_states: torch.Tensor, question_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Question tokens cross-attending the image → question_states [B, T, D]."""
        return self.model.text_encoder(input_ids=None if question_embeddings is not None else input_ids,
                                       encoder_embeds=question_embeddings, attention_mask=attention_mask,
                                       encoder_hidden_states=image_states).last_hidden_state

    def embedding_sigma(self, stream: str, embeddings: torch.Tensor) -> float:
        """The scale of Gaussian-noise corruption: std of the word-embedding matrix (text, as in
        ROME's causal tracing) or of the given image's patch embeddings (vision)."""
        if stream == "text":
            return float(self.model.text_encoder.embeddings.word_embeddings.weight.float().std())
        return float(embeddings[:, 1:].float().std())

    def decode(self, question_states: torch.Tensor, attention_mask: torch.Tensor,
               answer_prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder logits [B, S, V] for [DEC] + answer_prefix; S = 1 + prefix length."""
        batch = question_states.shape[0]
        bos = torch.full((batch, 1), self.bos_token_id, dtype=torch.long, device=question_states.device)
        decoder_ids = bos if answer_prefix is None else torch.cat([bos, answer_prefix], dim=1)
        return self.model.text_decoder(input_ids=decoder_ids, encoder_hidden_states=question_states,
                                       encoder_attention_mask=attention_mask).logits

    # ---------------------------------------------------------------- answers
    @torch.no_grad()
    def logits_from_inputs(self, inputs: BlipInputs) -> torch.Tensor:
        """First answer-step logits [B, V] for prepared inputs."""
        image_states = self.encode_image(inputs.pixel_values)
        question_states = self.encode_question(inputs.input_ids, inputs.attention_mask, image_states)
        return self.decode(question_states, inputs.attention_mask)[:, 0].float()

    @torch.no_grad()
    def answer_logits(self, images: Sequence[Image.Image], questions: Sequence[str],
                      batch_size: int = 64) -> torch.Tensor:
        """First answer-decoder step's logits over the vocabulary, [B, V] float32."""
        out: list[torch.Tensor | None] = [None] * len(questions)
        for index in self.batches_by_length(questions, batch_size):
            inputs = self.prepare([images[i] for i in index], [questions[i] for i in index])
            for i, row in zip(index, self.logits_from_inputs(inputs)):
                out[i] = row
        return torch.stack(out)  # type: ignore[arg-type]

    def batches_by_length(self, questions: Sequence[str], batch_size: int) -> list[list[int]]:
        """Index batches whose questions share a token length (BLIP's answer step sees padding)."""
        groups: dict[int, list[int]] = {}
        for i, question in enumerate(questions):
            groups.setdefault(self.token_length(question), []).append(i)
        return [idx[s:s + batch_size] for _, idx in sorted(groups.items()) for s in range(0, len(idx), batch_size)]

    @torch.no_grad()
    def score_answers(self, images: Sequence[Image.Image], questions: Sequence[str],
                      candidates: Sequence[str], scoring: str = "first_token") -> torch.Tensor:
        """Log-probability of each candidate answer, [B, C].

        "first_token": log p of the candidate's first wordpiece at the first answer step
        (what the original research code used, silently). "sequence": the summed log p of
        all its wordpieces, teacher-forced; equal to "first_token" for one-wordpiece answers.
        """
        if scoring not in ANSWER_SCORING:
            raise NoticeError(f"unknown answer scoring {scoring!r}: use one of {', '.join(ANSWER_SCORING)}")
        candidate_ids = [self.answer_token_ids(c) for c in candidates]
        scores = torch.empty(len(questions), len(candidates))
        for index in self.batches_by_length(questions, 64):
            inputs = self.prepare([images[i] for i in index], [questions[i] for i in index])
            image_states = self.encode_image(inputs.pixel_values)
            question_states = self.encode_question(inputs.input_ids, inputs.attention_mask, image_states)
            for c, ids in enumerate(candidate_ids):
                use = ids[:1] if scoring == "first_token" else ids
                prefix = torch.tensor([use[:-1]] * len(index), dtype=torch.long, device=self.device)
                logits = self.decode(question_states, inputs.attention_mask, prefix if prefix.shape[1] else None)
                logp = torch.log_softmax(logits.float(), dim=-1)
                target = torch.tensor(use, device=self.device)
                scores[index, c] = logp[:, torch.arange(len(use)), target].sum(dim=1).cpu()
        return scores

    @torch.no_grad()
    def generate(self, images: Sequence[Image.Image], questions: Sequence[str], max_new_tokens: int = 8,
                 batch_size: int = 64) -> list[str]:
        """Free-form greedy answers, as transformers' `generate` gives them."""
        answers: list[str] = [""] * len(questions)
        for index in self.batches_by_length(questions, batch_size):
            inputs = self.prepare([images[i] for i in index], [questions[i] for i in index])
            ids = self.model.generate(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values,
                                      attention_mask=inputs.attention_mask, max_new_tokens=max_new_tokens,
                                      do_sample=False)
            for i, text in zip(index, self.tokenizer.batch_decode(ids, skip_special_tokens=True)):
                answers[i] = text.strip()
        return answers

    # ------------------------------------------------------------- attention
    @torch.no_grad()
    def cross_attention(self, images: Sequence[Image.Image], questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-encoder cross-attention to the image, [B, layers, heads, T, I], and the image
        states it attends, [B, I, D]; one batch of equal-length questions."""
        inputs = self.prepare(images, questions)
        maps: list[torch.Tensor] = []
        hooks = [layer.crossattention.self.register_forward_hook(lambda _m, _i, out: maps.append(out[1]))
                 for layer in self.model.text_encoder.encoder.layer]
        try:
            image_states = self.encode_image(inputs.pixel_values)
            self.encode_question(inputs.input_ids, inputs.attention_mask, image_states)
        finally:
            for hook in hooks:
                hook.remove()
        return torch.stack(maps, dim=1).float(), image_states.float()

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        """(rows, columns, pixels per patch side) of the vision encoder's patches."""
        vision = self.model.config.vision_config
        grid = vision.image_size // vision.patch_size
        return grid, grid, vision.patch_size

    # ------------------------------------------------------------------ facts
    def describe(self) -> dict:
        return {"family": self.family, "name": self.name, "image_tokens": self.num_image_tokens,
                "vocab_size": int(self.model.config.text_config.vocab_size),
                "streams": {k: vars(v) for k, v in self.streams.items()}}
