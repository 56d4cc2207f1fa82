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
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from notice.errors import NoticeError
from notice.models.base import AdapterCommon, PatchBatch, Run, StreamFacts, Trace, resolve_dtype



@dataclass
class BlipInputs:
    """Processor output for one batch: equal-length questions, so no padding is involved."""

    pixel_values: torch.Tensor  # [B, 3, H, W]
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]


class BlipAdapter(AdapterCommon):
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
                                   "answer decoder; cross-attends the question tokens", reads_answer=True),
        }

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, source: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32",
                        name: str | None = None) -> "BlipAdapter":
        from transformers import BlipForQuestionAnswering, BlipProcessor

        model = BlipForQuestionAnswering.from_pretrained(str(source), dtype=resolve_dtype(dtype))
        processor = BlipProcessor.from_pretrained(str(source))
        return cls(model.to(device), processor, name or str(source))

    @staticmethod
    def prompt_limit(config) -> int:
        """The text encoder's position embeddings: a longer question cannot be read at all."""
        return int(config.text_config.max_position_embeddings)

    @classmethod
    def prompt_budget(cls, source: str | Path) -> tuple[int, Callable[[str], int]]:
        """(prompt_limit, question → token length) from the config and tokenizer alone, without weights."""
        from transformers import AutoTokenizer, BlipConfig

        tokenizer = AutoTokenizer.from_pretrained(str(source))
        return cls.prompt_limit(BlipConfig.from_pretrained(str(source))), partial(_question_length, tokenizer)

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
        return _question_length(self.tokenizer, question)

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

    def answer_context(self, inputs: BlipInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """What every answer step of these inputs reads: question states and their mask."""
        image_states = self.encode_image(inputs.pixel_values)
        return self.encode_question(inputs.input_ids, inputs.attention_mask, image_states), inputs.attention_mask

    def answer_step_logits(self, context: tuple[torch.Tensor, torch.Tensor], prefix: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1 + K, V] of the answer steps after [DEC] and a teacher-forced prefix [B, K]."""
        question_states, attention_mask = context
        return self.decode(question_states, attention_mask, prefix if prefix.shape[1] else None)

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

    def attention_query(self, question: str, answer: str) -> int:
        """The position whose cross-attention head-function analysis reads: the answer's first
        wordpiece in the question (an option of a two-way prompt), else the last word."""
        tokens = self.tokenize(question)
        first = self.tokenizer.convert_ids_to_tokens(self.answer_token_ids(answer))[0]
        return tokens.index(first) if first in tokens else max(0, len(tokens) - 3)  # [CLS] ... word ? [SEP]

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        """(rows, columns, pixels per patch side) of the vision encoder's patches."""
        vision = self.model.config.vision_config
        grid = vision.image_size // vision.patch_size
        return grid, grid, vision.patch_size

    # --------------------------------------------------------------- patching
    # Intermediates of one layer, by name (each [P, W] in a Trace):
    #   x             the layer's input hidden state
    #   self_attn.z   self-attention values before the output projection, head h at [h*d, (h+1)*d)
    #   self_attn     the self-attention's write (output projection, before the residual add)
    #   after_self    the residual stream after it (text: LayerNorm(x + self_attn); vision: x + self_attn)
    #   cross_attn.z, cross_attn, after_cross    the same for cross-attention (text and decoder)
    #   mlp           the MLP's write;  layer   the layer's output
    # Everything a layer does after its attention mixes positions is position-wise, so a patch at
    # some positions changes the patched layer's output only there: the engine recomputes those rows.

    def _layers(self, stream: str) -> torch.nn.ModuleList:
        if stream == "vision":
            return self.model.vision_model.encoder.layers
        if stream == "text":
            return self.model.text_encoder.encoder.layer
        return self.model.text_decoder.bert.encoder.layer

    def hook_point(self, site) -> tuple[torch.nn.Module, str]:
        """The module whose output (or input, for heads) holds a site's activation, as [B, P, W]."""
        layer = self._layers(site.stream)[site.layer]
        if site.component == "layer":
            return layer, "output"
        if site.stream == "vision":
            module = layer.self_attn.projection if site.component == "self_attn" else layer.mlp
        else:
            module = {"self_attn": layer.attention.output.dense, "cross_attn": layer.crossattention.output.dense,
                      "mlp": layer.output.dense}[site.component]
        return module, "input" if site.head is not None else "output"

    def site_columns(self, site) -> slice | None:
        """The columns of a head's values before the output projection; None for whole components."""
        if site.head is None:
            return None
        d = self.streams[site.stream].head_dim
        return slice(site.head * d, (site.head + 1) * d)

    @torch.no_grad()
    def run_logits(self, run: Run) -> torch.Tensor:
        """The plain forward of a run: first answer-step logits [B, V] float32."""
        image, question = self._embeddings(run)
        image_states = self.encode_image(image_embeddings=image)
        question_states = self.encode_question(None, run.inputs.attention_mask, image_states, question_embeddings=question)
        return self.decode(question_states, run.inputs.attention_mask)[:, 0].float()

    def num_positions(self, prompt: str) -> dict[str, int]:
        """How many positions each stream has for a prompt (sites' @position ranges)."""
        return {"vision": self.num_image_tokens, "text": self.token_length(prompt), "decoder": 1}

    def position_labels(self, run: Run) -> dict[str, list[str]]:
        grid = int(round(self.num_patches ** 0.5))
        tokens = self.tokenizer.convert_ids_to_tokens(run.inputs.input_ids[0].tolist())
        return {"vision": ["[CLS]"] + [f"patch {i // grid},{i % grid}" for i in range(self.num_patches)],
                "text": tokens, "decoder": ["[DEC]"]}

    def full_patch_sites(self, modality: str) -> list[str]:
        """Sites whose full patch (every position) must turn the receiving run into the source run:
        the earliest layer everything downstream depends on alone, per stream."""
        last = self.streams["text"].layers - 1
        if modality == "image":  # the question is shared: the vision stream is the only difference
            return ["vision.0.layer@all", f"text.{last}.layer@all", f"decoder.{last}.layer@all"]
        return ["text.0.layer@all", f"decoder.{last}.layer@all"]

    def cell_bytes(self, stream: str, num_positions: dict[str, int]) -> int:
        """A generous estimate of the transient memory one patched cell needs (for batch sizing)."""
        text, vision = self.streams["text"], self.streams["vision"]
        tokens, images, width = num_positions["text"], self.num_image_tokens, text.hidden
        vocab = int(self.model.config.text_config.vocab_size)
        # hidden states and MLP activations, cross-attention scores over the image, logits (float32 copies)
        floats = 16 * tokens * width + 3 * text.heads * tokens * images + 4 * vocab
        if stream == "vision":  # a whole image stream, its attention scores, fresh image keys/values
            floats += 16 * images * vision.hidden + 3 * vision.heads * images * images + 4 * images * width
        return floats * max(self.dtype.itemsize, 4)

    @torch.no_grad()
    def trace(self, run: Run, streams: set[str] | None = None) -> Trace:
        """The plain forward with hooks that keep every layer's intermediates (of `streams`) and the
        cross-attention keys/values that patched runs reuse."""
        streams = set(self.streams) if streams is None else set(streams) | {"text", "decoder"}
        acts: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        kv: dict[str, list[list[torch.Tensor]]] = {"text": [], "decoder": []}
        handles = []

        def keep(store: dict, name: str, kind: str, index: int = 0):
            def hook(module, args, output=None):
                value = args[0] if kind == "input" else (output[index] if isinstance(output, tuple) else output)
                store[name] = value[0].detach()
            return hook

        def add(module, store, name, kind, index=0):
            if kind == "input":
                handles.append(module.register_forward_pre_hook(keep(store, name, "input")))
            else:
                handles.append(module.register_forward_hook(keep(store, name, "output", index)))

        for stream in self.streams:
            for l, layer in enumerate(self._layers(stream)):
                store = acts.setdefault((stream, l), {})
                if stream in ("text", "decoder"):
                    pair: list[torch.Tensor] = []
                    kv[stream].append(pair)
                    for proj in (layer.crossattention.self.key, layer.crossattention.self.value):
                        handles.append(proj.register_forward_hook(
                            lambda m, a, out, pair=pair: pair.append(out[0].detach())))
                if stream not in streams:
                    continue
                add(layer, store, "x", "input")
                add(layer, store, "layer", "output")
                if stream == "vision":
                    add(layer.self_attn.projection, store, "self_attn.z", "input")
                    add(layer.self_attn.projection, store, "self_attn", "output")
                    add(layer.layer_norm2, store, "after_self", "input")
                    add(layer.mlp, store, "mlp", "output")
                else:
                    for part, name in ((layer.attention, "self_attn"), (layer.crossattention, "cross_attn")):
                        add(part.output.dense, store, f"{name}.z", "input")
                        add(part.output.dense, store, name, "output")
                        add(part, store, "after_self" if name == "self_attn" else "after_cross", "output", 0)
                    add(layer.output.dense, store, "mlp", "output")
        try:
            logits = self.run_logits(run)[0]
        finally:
            for handle in handles:
                handle.remove()
        acts = {key: value for key, value in acts.items() if value}
        heads = {s: self.streams[s].heads for s in ("text", "decoder")}
        cache = {f"{s}_kv": [tuple(_split_heads(t[None], heads[s]) for t in pair) for pair in kv[s]]
                 for s in ("text", "decoder")}
        cache["text_input"] = acts.get(("text", 0), {}).get("x")
        cache["decoder_input"] = acts.get(("decoder", 0), {}).get("x")
        positions = {"vision": self.num_image_tokens, "text": int(run.inputs.input_ids.shape[1]), "decoder": 1}
        return Trace(logits=logits, acts=acts, cache=cache, num_positions=positions)

    @torch.no_grad()
    def patched_logits(self, receiving: Trace, source: Trace, batches: Sequence[PatchBatch]) -> torch.Tensor:
        """First answer-step logits [N, V] of patched copies of the receiving run (N = cells of all
        batches, which share one stream and layer), each starting at the patched layer from the
        receiving run's cached state: nothing below it is recomputed."""
        stream, start = batches[0].stream, batches[0].layer
        assert all((b.stream, b.layer) == (stream, start) for b in batches), "one stream and layer per call"
        hidden = torch.cat([self._patched_layer(receiving, source, b) for b in batches])  # [N, P, D]
        cells = hidden.shape[0]
        if stream == "vision":
            hidden = self._run_stream("vision", start + 1, hidden)
            image_states = self.model.vision_model.post_layernorm(hidden)  # [N, I, D]
            text_in = receiving.cache["text_input"].expand(cells, -1, -1)
            hidden = self._run_stream("text", 0, text_in, memory=image_states)
            stream, start = "text", self.streams["text"].layers - 1
        if stream == "text":
            hidden = self._run_stream("text", start + 1, hidden, kv=receiving.cache["text_kv"])
            dec_in = receiving.cache["decoder_input"].expand(cells, -1, -1)
            hidden = self._run_stream("decoder", 0, dec_in, memory=hidden)
        else:
            hidden = self._run_stream("decoder", start + 1, hidden, kv=receiving.cache["decoder_kv"])
        return self.model.text_decoder.cls(hidden[:, 0]).float()

    def _patched_layer(self, receiving: Trace, source: Trace, batch: PatchBatch) -> torch.Tensor:
        """The patched layer's output [N, P, D]: the receiving run's, with the patched rows recomputed."""
        key, target, index = (batch.stream, batch.layer), batch.target, batch.positions  # index [N, K]
        mine, theirs = receiving.acts[key], source.acts[key]
        value = theirs[target][index]  # [N, K, W]
        if batch.columns is not None:
            value = torch.where(batch.columns[:, None, :], value, mine[target][index])
        rows = self._layer_tail(batch.stream, batch.layer, target, value, lambda name: mine[name][index],
                                receiving.cache)
        out = mine["layer"].expand(len(batch), -1, -1).clone()
        return out.scatter_(1, index[..., None].expand(-1, -1, out.shape[-1]), rows)

    def _layer_tail(self, stream: str, l: int, target: str, value: torch.Tensor, mine, cache: dict) -> torch.Tensor:
        """Finish layer l from a patched target, position-wise, on rows [N, K, ·]; mine(name) gives the
        receiving run's intermediates at those rows."""
        layer = self._layers(stream)[l]
        if target == "layer":
            return value
        if stream == "vision":
            if target == "mlp":
                return mine("after_self") + value
            write = value if target == "self_attn" else layer.self_attn.projection(value)
            resid = mine("x") + write
            return resid + layer.mlp(layer.layer_norm2(resid))
        if target == "mlp":
            return layer.output.LayerNorm(value + mine("after_cross"))
        if target.startswith("cross_attn"):
            write = value if target == "cross_attn" else layer.crossattention.output.dense(value)
            after_cross = layer.crossattention.output.LayerNorm(write + mine("after_self"))
        else:
            write = value if target == "self_attn" else layer.attention.output.dense(value)
            after_self = layer.attention.output.LayerNorm(write + mine("x"))
            after_cross = self._bert_cross(layer, after_self, cache[f"{stream}_kv"][l])
        return self._bert_mlp(layer, after_cross)

    def _run_stream(self, stream: str, start: int, hidden: torch.Tensor, kv: list | None = None,
                    memory: torch.Tensor | None = None) -> torch.Tensor:
        """Layers start.. of a stream on [N, P, D]; cross-attention reads cached per-layer keys/values
        (`kv`, shared by all cells) or attends per-cell `memory` [N, M, D]."""
        layers = self._layers(stream)
        heads = self.streams[stream].heads
        for l in range(start, len(layers)):
            if stream == "vision":
                hidden = self._vit_layer(layers[l], hidden)
            else:
                hidden = self._bert_layer(layers[l], hidden, kv[l] if kv is not None else memory, heads,
                                          causal=stream == "decoder")
        return hidden

    def _vit_layer(self, layer, x: torch.Tensor) -> torch.Tensor:
        """BlipEncoderLayer (pre-LayerNorm ViT) on [N, I, D]."""
        attn = layer.self_attn
        qkv = attn.qkv(layer.layer_norm1(x))  # [N, I, 3D]
        q, k, v = (_split_heads(t, attn.num_heads) for t in qkv.chunk(3, dim=-1))
        z = _merge_heads(F.scaled_dot_product_attention(q, k, v))
        resid = x + attn.projection(z)
        return resid + layer.mlp(layer.layer_norm2(resid))

    def _bert_layer(self, layer, x: torch.Tensor, memory, heads: int, causal: bool) -> torch.Tensor:
        """BlipTextLayer (post-LayerNorm BERT with cross-attention) on [N, P, D]."""
        sa = layer.attention.self
        if x.shape[1] == 1:  # one position attends only itself: softmax is exactly 1, the output its value
            z = sa.value(x)
        else:
            q, k, v = (_split_heads(proj(x), heads) for proj in (sa.query, sa.key, sa.value))
            z = _merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        after_self = layer.attention.output.LayerNorm(layer.attention.output.dense(z) + x)
        return self._bert_mlp(layer, self._bert_cross(layer, after_self, memory))

    def _bert_cross(self, layer, x: torch.Tensor, memory) -> torch.Tensor:
        """Cross-attention sublayer on rows [N, K, D]. `memory` is a (keys, values) pair [1 or N, H, M, d]
        cached for all cells, or per-cell states [N, M, D] to attend."""
        cross = layer.crossattention.self
        heads = self.streams["text"].heads
        q = _split_heads(cross.query(x), heads)  # [N, H, K, d]
        n, h, k, d = q.shape
        if isinstance(memory, torch.Tensor):
            m, width = memory.shape[1], h * d
            if k * (width + h * m) < m * width:
                z = _absorbed_attention(q, memory, cross.key, cross.value)  # few queries: skip projecting memory
            else:
                z = F.scaled_dot_product_attention(q, _split_heads(cross.key(memory), h),
                                                   _split_heads(cross.value(memory), h))
        else:
            keys, values = memory
            if keys.shape[0] == 1 and n > 1:  # shared memory: all cells' queries in one attention call
                z = F.scaled_dot_product_attention(q.transpose(0, 1).reshape(1, h, n * k, d), keys, values)
                z = z.reshape(h, n, k, d).transpose(0, 1)
            else:
                z = F.scaled_dot_product_attention(q, keys, values)
        out = layer.crossattention.output
        return out.LayerNorm(out.dense(_merge_heads(z)) + x)

    def _bert_mlp(self, layer, x: torch.Tensor) -> torch.Tensor:
        return layer.output.LayerNorm(layer.output.dense(layer.intermediate(x)) + x)

    # ------------------------------------------------------------------ facts
    def describe(self) -> dict:
        return {"family": self.family, "name": self.name, "image_tokens": self.num_image_tokens,
                "vocab_size": int(self.model.config.text_config.vocab_size),
                "streams": {k: vars(v) for k, v in self.streams.items()}}


def _question_length(tokenizer, question: str) -> int:
    """Positions the text encoder reads for a question, [CLS] and [SEP] included."""
    return len(tokenizer(question)["input_ids"])


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, P, H*d] → [N, H, P, d]"""
    n, p, width = x.shape
    return x.view(n, p, heads, width // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[N, H, P, d] → [N, P, H*d]"""
    n, h, p, d = x.shape
    return x.transpose(1, 2).reshape(n, p, h * d)


def _absorbed_attention(q: torch.Tensor, memory: torch.Tensor, key: torch.nn.Linear,
                        value: torch.nn.Linear) -> torch.Tensor:
    """softmax(q·(memory Wk + bk)ᵀ/√d)·(memory Wv + bv) without projecting the memory: the key
    projection moves onto the queries and the value projection after the weighted sum (attention
    weights sum to 1; the key bias adds one constant per query and head, which softmax ignores).
    q [N, H, K, d], memory [N, M, E] → [N, H, K, d]. Cheaper when K·d ≪ M·E (the answer decoder)."""
    n, h, k, d = q.shape
    w_key = key.weight.view(h, d, -1)  # [H, d, E]
    w_value = value.weight.view(h, d, -1)
    q_mem = torch.einsum("nhkd,hde->nhke", q, w_key)  # [N, H, K, E]
    scores = torch.einsum("nhke,nme->nhkm", q_mem, memory) * d ** -0.5
    mixed = torch.einsum("nhkm,nme->nhke", scores.softmax(dim=-1), memory)  # [N, H, K, E]
    return torch.einsum("nhke,hde->nhkd", mixed, w_value) + value.bias.view(1, h, 1, d)
