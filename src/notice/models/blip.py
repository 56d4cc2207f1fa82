"""BLIP visual question answering (transformers' `BlipForQuestionAnswering`).

    pixel_values ──vision (ViT)──▶ image_states [B, I, D]             (I = patches + 1: [CLS] first)
    input_ids + image_states ──text encoder (cross-attends the image)──▶ question_states [B, T, D]
    [DEC] + question_states ──answer decoder (cross-attends the question)──▶ logits [B, V]

Streams: `vision`, `text` (positions: question wordpieces, [CLS] and [SEP] included) and `decoder`
(one position, [DEC], where the first answer token is read).
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from notice.models.blocks.attention import AttentionInputs
from notice.models.base import (ImageAttention, ModelAdapter, PatchBatch, Run, StreamFacts, StreamMap, Trace,
                                check_batch, grid_labels)
from notice.models.blocks import BertBlock, CrossAttention, EncoderBlock

BERT_WRITES = {"self_attn": "attention.output.dense", "cross_attn": "crossattention.output.dense",
               "mlp": "output.dense"}
BERT_HEADS = {k: v for k, v in BERT_WRITES.items() if k != "mlp"}
STREAM_MAPS = {
    "vision": StreamMap("vision_model.encoder.layers", writes={"self_attn": "self_attn.projection", "mlp": "mlp"},
                        heads={"self_attn": "self_attn.projection"}),
    "text": StreamMap("text_encoder.encoder.layer", writes=BERT_WRITES, heads=BERT_HEADS),
    "decoder": StreamMap("text_decoder.bert.encoder.layer", writes=BERT_WRITES, heads=BERT_HEADS),
}


def vit_block(layer, heads: int) -> EncoderBlock:
    return EncoderBlock(out=layer.self_attn.projection, mlp_norm=layer.layer_norm2, mlp=layer.mlp,
                        attn_norm=layer.layer_norm1, qkv=lambda x: layer.self_attn.qkv(x).chunk(3, dim=-1), heads=heads)


def bert_block(layer, heads: int, causal: bool) -> BertBlock:
    cross = layer.crossattention
    return BertBlock(query=layer.attention.self.query, key=layer.attention.self.key, value=layer.attention.self.value,
                     self_out=layer.attention.output.dense, self_norm=layer.attention.output.LayerNorm,
                     intermediate=layer.intermediate, output=layer.output.dense, output_norm=layer.output.LayerNorm,
                     heads=heads, causal=causal,
                     crossing=CrossAttention(cross.self.query, cross.self.key, cross.self.value, cross.output.dense,
                                             cross.output.LayerNorm))


class BlipAdapter(ModelAdapter):
    family = "blip"
    model_class, processor_class = "BlipForQuestionAnswering", "BlipProcessor"
    trace_outputs = {"image_states": "vision_model.post_layernorm"}

    def __init__(self, model, processor, name: str):
        super().__init__(model, processor, name)
        vision, text = model.config.vision_config, model.config.text_config
        self.bos_token_id = int(text.bos_token_id)
        self.grid = vision.image_size // vision.patch_size
        patches = self.grid * self.grid
        bert = ("layer", "self_attn", "cross_attn", "mlp")
        self.streams = {
            "vision": StreamFacts.of("vision", vision, ("layer", "self_attn", "mlp"), "patch",
                                     f"ViT image encoder over {patches + 1} tokens ([CLS] + {self.grid}x{self.grid} patches)"),
            "text": StreamFacts.of("text", text, bert, "token", "question encoder; cross-attends the image tokens"),
            "decoder": StreamFacts.of("decoder", text, bert, "answer", "answer decoder; cross-attends the question tokens",
                                      reads_answer=True),
        }
        self.stream_maps = STREAM_MAPS
        self.blocks = {
            "vision": [vit_block(l, vision.num_attention_heads) for l in model.vision_model.encoder.layers],
            "text": [bert_block(l, text.num_attention_heads, False) for l in model.text_encoder.encoder.layer],
            "decoder": [bert_block(l, text.num_attention_heads, True) for l in model.text_decoder.bert.encoder.layer],
        }

    @classmethod
    def prompt_ids(cls, processor, question: str) -> list[int]:
        """The question's wordpieces as the text encoder reads them, [CLS] and [SEP] included."""
        return processor.tokenizer(question)["input_ids"]

    # ----------------------------------------------------------------- prompts
    def prepare(self, images: Sequence[Image.Image], questions: Sequence[str]):
        """Processor inputs for one batch; the questions must tokenize to one length."""
        check_batch(images, questions)
        encoded = self.processor(images=list(images), text=list(questions), return_tensors="pt", padding=True)
        if not bool(encoded["attention_mask"].all()):
            raise ValueError("questions of one batch must have the same token length; use batches_by_length")
        return encoded.to(self.device).to(self.dtype)  # floats only: the ids stay long

    @property
    def word_embeddings(self) -> torch.nn.Embedding:
        return self.model.text_encoder.embeddings.word_embeddings

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        return self.grid, self.grid, self.model.config.vision_config.patch_size

    def image_token_count(self) -> int:
        return self.grid * self.grid + 1

    # ------------------------------------------------------------------ stages
    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model.embeddings(pixel_values)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word + position embeddings after their LayerNorm, [B, T, D]."""
        return self.model.text_encoder.embeddings(input_ids=input_ids)

    def encode_image(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision_model
        return vision.post_layernorm(vision.encoder(inputs_embeds=image_embeddings).last_hidden_state)

    def encode_question(self, inputs, image_states: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
        return self.model.text_encoder(encoder_embeds=token_embeddings, attention_mask=inputs.attention_mask,
                                       encoder_hidden_states=image_states).last_hidden_state

    def decode(self, question_states: torch.Tensor, attention_mask: torch.Tensor,
               prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder logits [B, 1 + K, V] for [DEC] + a teacher-forced prefix [B, K]."""
        bos = torch.full((question_states.shape[0], 1), self.bos_token_id, dtype=torch.long, device=self.device)
        ids = bos if prefix is None or not prefix.shape[1] else torch.cat([bos, prefix], dim=1)
        return self.model.text_decoder(input_ids=ids, encoder_hidden_states=question_states,
                                       encoder_attention_mask=attention_mask).logits

    def logits_from_states(self, inputs, image_states: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
        question_states = self.encode_question(inputs, image_states, token_embeddings)
        return self.decode(question_states, inputs.attention_mask)[:, 0]

    def answer_context(self, inputs):
        image_states = self.encode_image(self.embed_image(inputs.pixel_values))
        return self.encode_question(inputs, image_states, self.embed_tokens(inputs.input_ids)), inputs.attention_mask

    def answer_step_logits(self, context, prefix: torch.Tensor) -> torch.Tensor:
        question_states, attention_mask = context
        return self.decode(question_states, attention_mask, prefix)

    @torch.no_grad()
    def generate(self, images: Sequence[Image.Image], questions: Sequence[str], max_new_tokens: int = 8) -> list[str]:
        answers: list[str] = [""] * len(questions)
        for index in self.batches_by_length(questions, self.answer_batch_size):
            inputs = self.prepare([images[i] for i in index], [questions[i] for i in index])
            ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            for i, text in zip(index, self.tokenizer.batch_decode(ids, skip_special_tokens=True)):
                answers[i] = text.strip()
        return answers

    # --------------------------------------------------------------- positions
    def num_positions(self, run: Run) -> dict[str, int]:
        return {"vision": self.image_token_count(), "text": int(run.inputs.input_ids.shape[1]), "decoder": 1}

    def position_labels(self, run: Run) -> dict[str, list[str]]:
        tokens = self.tokenizer.convert_ids_to_tokens(run.inputs.input_ids[0].tolist())
        return {"vision": ["[CLS]"] + grid_labels(self.grid, self.grid), "text": tokens, "decoder": ["[DEC]"]}

    # ---------------------------------------------------------------- patching
    def traced_streams(self, streams: set[str]) -> set[str]:
        return set(streams) | {"text", "decoder"}  # their inputs and outputs are the reruns' memories

    def trace_cache(self, run: Run, acts, kept) -> dict:
        """Cross-attention keys/values of the unchanged memories (the image for text reruns, the question
        for decoder reruns), and the streams' inputs, where reruns of earlier streams enter."""
        question_states = acts[("text", self.streams["text"].layers - 1)]["layer"]
        return {"image_states": kept["image_states"], "text_kv": [b.cross_kv(kept["image_states"]) for b in self.blocks["text"]],
                "decoder_kv": [b.cross_kv(question_states) for b in self.blocks["decoder"]],
                "text_input": acts[("text", 0)]["x"], "decoder_input": acts[("decoder", 0)]["x"]}

    @torch.no_grad()
    def patched_logits(self, receiving: Trace, source: Trace, batches: Sequence[PatchBatch]) -> torch.Tensor:
        """Each cell starts at its patched layer from the receiving run's cached state; a memory that no
        patch changed is read through cached keys/values, a patched one per cell."""
        stream, start = batches[0].stream, batches[0].layer
        assert all((b.stream, b.layer) == (stream, start) for b in batches), "one stream and layer per call"
        kv = receiving.cache.get(f"{stream}_kv")
        hidden = torch.cat([self.patched_layer(receiving, source, b, **({"memory": kv[start]} if kv else {}))
                            for b in batches])  # [N, P, D]
        cells = hidden.shape[0]
        if stream == "vision":
            for block in self.blocks["vision"][start + 1:]:
                hidden = block.forward(hidden)
            image_states = self.model.vision_model.post_layernorm(hidden)
            hidden = self._run("text", 0, receiving.cache["text_input"].expand(cells, -1, -1), image_states)
            stream, start = "text", self.streams["text"].layers - 1
        if stream == "text":
            question_states = self._run("text", start + 1, hidden, receiving.cache["text_kv"])
            hidden = self._run("decoder", 0, receiving.cache["decoder_input"].expand(cells, -1, -1), question_states)
        else:
            hidden = self._run("decoder", start + 1, hidden, receiving.cache["decoder_kv"])
        return self.model.text_decoder.cls(hidden[:, 0]).float()

    def _run(self, stream: str, start: int, hidden: torch.Tensor, memory) -> torch.Tensor:
        """Layers start.. of a BERT stream; memory: cached keys/values per layer, or per-cell states."""
        for l in range(start, self.streams[stream].layers):
            hidden = self.blocks[stream][l].forward(hidden, memory[l] if isinstance(memory, list) else memory)
        return hidden

    @property
    def gradient_streams(self) -> tuple[str, ...]:
        return ("text", "decoder")

    def attention_inputs(self, trace: Trace, stream: str, layer: int, component: str) -> AttentionInputs:
        if component != "cross_attn":
            return super().attention_inputs(trace, stream, layer, component)
        memory = trace.cache["image_states"] if stream == "text" else trace.acts[("text", self.streams["text"].layers - 1)]["layer"]
        return self.blocks[stream][layer].cross_inputs(trace.acts[(stream, layer)]["after_self"], memory)

    def full_patch_sites(self, modality: str) -> list[str]:
        last = self.streams["text"].layers - 1
        if modality == "image":  # the question is shared: the vision stream is the only difference
            return ["vision.0.layer@all", f"text.{last}.layer@all", f"decoder.{last}.layer@all"]
        return ["text.0.layer@all", f"decoder.{last}.layer@all"]

    def cell_bytes(self, stream: str, num_positions: dict[str, int]) -> int:
        text, vision = self.streams["text"], self.streams["vision"]
        tokens, images, width = num_positions["text"], self.image_token_count(), text.hidden
        # hidden states and MLP activations, cross-attention scores over the image, logits (float32 copies)
        floats = 16 * tokens * width + 3 * text.heads * tokens * images + 4 * self.vocab_size
        if stream == "vision":  # a whole image stream, its attention scores, fresh image keys/values
            floats += 16 * images * vision.hidden + 3 * vision.heads * images * images + 4 * images * width
        return floats * max(self.dtype.itemsize, 4)

    # ---------------------------------------------------------- head functions
    @torch.no_grad()
    def image_attention(self, image: Image.Image, question: str, answer: str) -> ImageAttention:
        """Text-encoder cross-attention to the image patches ([CLS] dropped), read at the answer's first
        wordpiece in the question (an option of a two-way prompt), else at the last word."""
        run = Run(self.prepare([image], [question]))
        trace = self.trace(run, {"text"})
        image_states = self.encode_image(self.embed_image(run.inputs.pixel_values))  # [1, I, D]
        weights = torch.stack([block.cross_weights(trace.acts[("text", l)]["after_self"][None], image_states)[0]
                               for l, block in enumerate(self.blocks["text"])])  # [L, H, T, I]
        tokens = self.tokenize(question)
        first = self.tokenizer.convert_ids_to_tokens(self.answer_token_ids(answer))[0]
        query = tokens.index(first) if first in tokens else max(0, len(tokens) - 3)  # [CLS] ... word ? [SEP]
        return ImageAttention("text", "cross_attn", weights[..., 1:], image_states[0, 1:].float(), query,
                              (self.grid, self.grid))

