"""LLaVA (transformers' `LlavaForConditionalGeneration`, e.g. llava-hf/llava-1.5-7b-hf).

    pixel_values ──vision tower (CLIP)──▶ hidden states of layer `feature_layer` [B, 1+P, Dv]
      ──drop [CLS] ("default" strategy)──▶ projector (MLP) ──▶ image_features [B, I, D]
    input_ids with <image> expanded to I tokens, whose embeddings are replaced by image_features
      ──language model (causal, grouped-query attention)──▶ logits at the last position [B, V]

The answer is the next token after the chat template's generation prompt. Streams of sites:
`vision` (the tower's layers that feed the projector), `projector` (one layer; its positions are
image tokens 0..I-1) and `lm` (positions index the full input ids, image tokens included; use
`image_positions` / `text_positions` rather than constants). A head of `lm.L.self_attn.headH` is a
query head: its values before `o_proj` at columns [H*d, (H+1)*d). Under grouped-query attention
query heads H that share one key/value head keep their own slices there, so patching one query head
never touches the keys or values its group shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from notice.errors import NoticeError
from notice.models.base import AdapterCommon, PatchBatch, Run, StreamFacts, Trace, resolve_dtype



@dataclass
class LlavaInputs:
    """Processor output for one batch of equal-length prompts (no padding, so RoPE positions agree)."""

    pixel_values: torch.Tensor  # [B, 3, H, W]
    input_ids: torch.Tensor  # [B, T], <image> expanded to one token per image feature
    attention_mask: torch.Tensor  # [B, T]


class LlavaAdapter(AdapterCommon):
    """Loading, prompts, answer logits, positions and patching for LLaVA checkpoints."""

    family = "llava"
    text_stream = "lm"
    cross_layer_streams = frozenset({"lm"})  # patched_logits runs patches of several LM layers in one call
    answer_batch_size = 16

    def __init__(self, model, processor, name: str):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.name = name
        config = model.config
        vision, text = config.vision_config, config.text_config
        if processor.chat_template is None:
            raise NoticeError(f"model {name!r} has a processor without a chat template: save one with the processor "
                              "(LLaVA prompts are built by the chat template)")
        self.image_token_id = int(config.image_token_id)
        feature_layer = config.vision_feature_layer
        if not isinstance(feature_layer, int):
            feature_layer = max(feature_layer, key=lambda i: i % (vision.num_hidden_layers + 1))
        # hidden_states[k] is the output of layer k-1 (0 is the embeddings): later layers never reach the LM
        self.vision_layers_used = feature_layer % (vision.num_hidden_layers + 1)
        self.drop_cls = config.vision_feature_select_strategy == "default"
        grid = vision.image_size // vision.patch_size
        self.num_patches = grid * grid
        self.num_image_tokens = self.num_patches + (0 if self.drop_cls else 1)
        lm_layer = self._lm.layers[0]
        self.num_kv_heads = int(text.num_key_value_heads or text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        for part in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp"):
            if not hasattr(lm_layer, part):
                raise NoticeError(f"model {name!r}: its language model layers have no {part}; notice supports "
                                  "Llama-style decoders (llava-1.5, Vicuna, Mistral)")
        self.streams = {
            "vision": StreamFacts("vision", self.vision_layers_used, vision.num_attention_heads,
                                  vision.hidden_size // vision.num_attention_heads, vision.hidden_size,
                                  ("layer", "self_attn", "mlp"), "patch",
                                  f"CLIP vision tower over {self.num_patches + 1} tokens ([CLS] + {grid}x{grid} "
                                  f"patches); layers 0..{self.vision_layers_used - 1} feed the projector"),
            "projector": StreamFacts("projector", 1, 0, 0, text.hidden_size, ("layer",), "image token",
                                     f"multimodal projector output: {self.num_image_tokens} image tokens"),
            "lm": StreamFacts("lm", text.num_hidden_layers, text.num_attention_heads, head_dim, text.hidden_size,
                              ("layer", "self_attn", "mlp"), "token",
                              f"causal language model over the prompt, image tokens included; grouped-query "
                              f"attention: {text.num_attention_heads} query heads share "
                              f"{self.num_kv_heads} key/value heads", reads_answer=True),
        }

    @property
    def _lm(self):
        return self.model.model.language_model

    @property
    def _vision(self):
        return self.model.model.vision_tower

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, source: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32",
                        name: str | None = None, load_in_4bit: bool = False) -> "LlavaAdapter":
        from transformers import LlavaForConditionalGeneration, LlavaProcessor

        torch_dtype = resolve_dtype(dtype)
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if load_in_4bit:
            kwargs["quantization_config"] = four_bit_config(torch_dtype)
            kwargs["device_map"] = {"": device}
        model = LlavaForConditionalGeneration.from_pretrained(str(source), **kwargs)
        processor = LlavaProcessor.from_pretrained(str(source))
        return cls(model if load_in_4bit else model.to(device), processor, name or str(source))

    @staticmethod
    def prompt_limit(config) -> int:
        """The language model's trained context: image tokens, template and question together."""
        return int(config.text_config.max_position_embeddings)

    @classmethod
    def prompt_budget(cls, source: str | Path) -> tuple[int, Callable[[str], int]]:
        """(prompt_limit, question → prompt length) from the config and processor alone, without weights."""
        from transformers import LlavaConfig, LlavaProcessor

        processor = LlavaProcessor.from_pretrained(str(source))
        return (cls.prompt_limit(LlavaConfig.from_pretrained(str(source))),
                lambda question: len(_prompt_ids(processor, question)))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations run in (4-bit weights compute in the embeddings' dtype)."""
        return self._lm.embed_tokens.weight.dtype

    # ----------------------------------------------------------------- inputs
    def prompt(self, question: str) -> str:
        """The question in the model's chat template, one image before it, ending where the answer starts."""
        return _chat_prompt(self.processor, question)

    def prepare(self, images: Sequence[Image.Image], questions: Sequence[str]) -> LlavaInputs:
        """Processor inputs for one batch; the prompts must tokenize to one length."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        for question in questions:
            if not question or not question.strip():
                raise NoticeError("empty question: ask something about the image, e.g. \"what color is the shape?\"")
        encoded = self.processor(images=list(images), text=[self.prompt(q) for q in questions],
                                 return_tensors="pt", padding=True)
        if not bool(encoded["attention_mask"].all()):
            raise ValueError("prompts of one batch must have the same token length; use batches_by_length")
        inputs = LlavaInputs(encoded["pixel_values"].to(self.device, self.dtype),
                             encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device))
        self.image_positions(inputs.input_ids[0])  # checks the expansion once per batch
        return inputs

    def _prompt_ids(self, question: str) -> list[int]:
        return _prompt_ids(self.processor, question)

    def tokenize(self, question: str) -> list[str]:
        """Tokens of the whole prompt as the language model sees it; `lm` positions index this list."""
        return self.tokenizer.convert_ids_to_tokens(self._prompt_ids(question))

    def token_length(self, question: str) -> int:
        return len(self._prompt_ids(question))

    def answer_token_ids(self, answer: str) -> list[int]:
        """Token ids of an answer as it would follow the prompt, without <s>."""
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise NoticeError(f"answer {answer!r} has no tokens: give a non-empty answer word")
        return ids

    # -------------------------------------------------------------- positions
    def image_positions(self, input_ids: torch.Tensor) -> range:
        """The span of image tokens in one prompt's ids [T]: where `lm` sites see the image."""
        where = (input_ids == self.image_token_id).nonzero().flatten().tolist()
        if len(where) != self.num_image_tokens or where[-1] - where[0] + 1 != len(where):
            raise NoticeError(f"the prompt holds {len(where)} image tokens, not one contiguous run of "
                              f"{self.num_image_tokens}: put exactly one image in the prompt")
        return range(where[0], where[-1] + 1)

    def text_positions(self, input_ids: torch.Tensor) -> list[int]:
        """Every `lm` position that is not an image token, in order (prompt words, template, <s>)."""
        return (input_ids != self.image_token_id).nonzero().flatten().tolist()

    def answer_position(self, input_ids: torch.Tensor) -> int:
        """The last prompt position: its output is the answer's first token."""
        return int(input_ids.shape[-1]) - 1

    def question_positions(self, question: str) -> list[int]:
        """Positions of the tokens that spell the question within the full prompt (STR token sites),
        found from character offsets, so a template that glues text to the question still works."""
        prompt = self.prompt(question)
        begin = prompt.rindex(question)
        end = begin + len(question)
        encoded = self.tokenizer(prompt, return_offsets_mapping=True)
        shift, out = 0, []
        for i, (token, (a, b)) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"])):
            if token == self.image_token_id:
                shift = self.num_image_tokens - 1  # the processor expands the one <image> token
            elif a < end and b > begin:
                out.append(i + shift)
        return out

    # ----------------------------------------------------------------- stages
    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings before the vision tower's pre-LayerNorm, [B, 1+P, Dv]."""
        return self._vision.embeddings(pixel_values)

    def encode_image(self, pixel_values: torch.Tensor | None = None,
                     image_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 3, H, W] (or its embeddings) → image_features [B, I, D] in the LM's width."""
        if image_embeddings is None:
            image_embeddings = self.embed_image(pixel_values)
        hidden = self._vision.pre_layrnorm(image_embeddings)
        for layer in self._vision.encoder.layers[:self.vision_layers_used]:
            hidden = layer(hidden, None)
        return self.project(hidden)

    def project(self, vision_states: torch.Tensor) -> torch.Tensor:
        """Selected vision states [B, 1+P, Dv] → image_features [B, I, D]."""
        return self.model.model.multi_modal_projector(vision_states[:, 1:] if self.drop_cls else vision_states)

    def embed_question(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, D] (image positions hold the <image> token's embedding)."""
        return self._lm.embed_tokens(input_ids)

    def merge(self, input_ids: torch.Tensor, token_embeddings: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """The LM's input [B, T, D]: token embeddings with image features at the image positions."""
        mask = (input_ids == self.image_token_id)[..., None]
        return token_embeddings.masked_scatter(mask, image_features.to(token_embeddings.dtype))

    def run_lm(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Logits at the last position [B, V] of the language model run on unpadded inputs [B, T, D]."""
        hidden = self._lm(inputs_embeds=inputs_embeds, use_cache=False).last_hidden_state
        return self.model.lm_head(hidden[:, -1])

    def embedding_sigma(self, stream: str, embeddings: torch.Tensor) -> float:
        """The scale of Gaussian-noise corruption: std of the token-embedding matrix (text) or of
        the given image's patch embeddings (vision)."""
        if stream in ("text", "lm"):
            return float(self._lm.embed_tokens.weight.float().std())
        return float(embeddings[:, 1:].float().std())

    # ---------------------------------------------------------------- answers
    @torch.no_grad()
    def logits_from_inputs(self, inputs: LlavaInputs) -> torch.Tensor:
        """Next-token logits [B, V] float32 at the end of the prompt."""
        features = self.encode_image(inputs.pixel_values)
        embeds = self.merge(inputs.input_ids, self.embed_question(inputs.input_ids), features)
        return self.run_lm(embeds).float()

    @torch.no_grad()
    def logits_from_embeddings(self, inputs: LlavaInputs, image_embeddings: torch.Tensor,
                               token_embeddings: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, V] float32 from vision embeddings [B, 1+P, Dv] and token embeddings
        [B, T, D] (e.g. with Gaussian noise added; noise at image-token positions is overwritten)."""
        features = self.encode_image(image_embeddings=image_embeddings)
        return self.run_lm(self.merge(inputs.input_ids, token_embeddings, features)).float()

    def answer_context(self, inputs: LlavaInputs) -> torch.Tensor:
        """What every answer step of these inputs reads: the prompt's embeddings [B, T, D]."""
        return self.merge(inputs.input_ids, self.embed_question(inputs.input_ids), self.encode_image(inputs.pixel_values))

    def answer_step_logits(self, prompt: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1 + K, V] of the answer steps after the prompt and a teacher-forced prefix [B, K]."""
        embeds = torch.cat([prompt, self.embed_question(prefix)], dim=1)
        hidden = self._lm(inputs_embeds=embeds, use_cache=False).last_hidden_state
        return self.model.lm_head(hidden[:, -(prefix.shape[1] + 1):])

    @torch.no_grad()
    def generate(self, images: Sequence[Image.Image], questions: Sequence[str], max_new_tokens: int = 8,
                 batch_size: int = 16) -> list[str]:
        """Free-form greedy answers, as transformers' `generate` gives them."""
        answers: list[str] = [""] * len(questions)
        for index in self.batches_by_length(questions, batch_size):
            inputs = self.prepare([images[i] for i in index], [questions[i] for i in index])
            ids = self.model.generate(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values,
                                      attention_mask=inputs.attention_mask, max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
            new = ids[:, inputs.input_ids.shape[1]:]
            for i, text in zip(index, self.tokenizer.batch_decode(new, skip_special_tokens=True)):
                answers[i] = text.strip()
        return answers

    @torch.no_grad()
    def prompt_positions(self, question: str, positions: Sequence[int]) -> list[int]:
        """Positions of the question tokenized alone (special tokens included) in the full prompt,
        matched by the characters they cover, after `<image>` is expanded."""
        alone = self.tokenizer(question, return_offsets_mapping=True)["offset_mapping"]
        spans = [alone[p] for p in positions if alone[p][1] > alone[p][0]]
        prompt = self.prompt(question)
        begin = prompt.rindex(question)
        encoded = self.tokenizer(prompt, return_offsets_mapping=True)
        shift, out = 0, []
        for i, (token, (a, b)) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"])):
            if token == self.image_token_id:
                shift = self.num_image_tokens - 1
            elif b > a and any(a - begin < end and b - begin > start for start, end in spans):
                out.append(i + shift)
        return out

    def attention_query(self, question: str, answer: str) -> int:
        """The position whose attention head-function analysis reads: the last prompt token,
        whose output is the answer's first token."""
        return self.token_length(question) - 1

    def cross_attention(self, images: Sequence[Image.Image], questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention of every prompt position to the image, in BLIP's cross-attention layout for
        head-function analysis: [B, layers, heads, T, 1+I] (column 0: all attention to non-image
        tokens; columns 1..I: each image token) and the image tokens' LM inputs [B, 1+I, D] (row 0 zeros)."""
        from transformers.models.llama.modeling_llama import repeat_kv

        inputs = self.prepare(images, questions)
        features = self.encode_image(inputs.pixel_values)
        hidden = self.merge(inputs.input_ids, self.embed_question(inputs.input_ids), features)
        batch, tokens = inputs.input_ids.shape
        span = self.image_positions(inputs.input_ids[0])
        rope = self._rope(hidden, torch.arange(tokens, device=hidden.device))
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=hidden.device).tril()
        maps = []
        for layer in self._lm.layers:
            attn = layer.self_attn
            normed = layer.input_layernorm(hidden)
            query = attn.q_proj(normed).view(batch, tokens, -1, attn.head_dim).transpose(1, 2)
            query = _rotate(query, rope)
            keys, _ = self._keys_values(layer, normed, rope)
            scores = query @ repeat_kv(keys, attn.num_key_value_groups).transpose(2, 3) * attn.scaling
            weights = scores.masked_fill(~causal, float("-inf")).float().softmax(-1)  # [B, H, T, T]
            image = weights[..., span.start:span.stop]
            maps.append(torch.cat([weights.sum(-1, keepdim=True) - image.sum(-1, keepdim=True), image], dim=-1))
            hidden = layer(hidden, position_embeddings=rope, attention_mask=None)
        states = torch.cat([torch.zeros_like(features[:, :1]), features], dim=1)
        return torch.stack(maps, dim=1), states.float()

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        """(rows, columns, pixels per patch side) of the vision tower's patches."""
        vision = self.model.config.vision_config
        grid = vision.image_size // vision.patch_size
        return grid, grid, vision.patch_size

    # ------------------------------------------------------------------ facts
    def describe(self) -> dict:
        return {"family": self.family, "name": self.name, "image_tokens": self.num_image_tokens,
                "vocab_size": int(self.model.config.text_config.vocab_size),
                "streams": {k: vars(v) for k, v in self.streams.items()}}

    # --------------------------------------------------------------- patching
    # Intermediates of one layer, by name (each [P, W] in a Trace):
    #   x            the layer's input (residual stream)
    #   self_attn.z  attention values before the output projection, query head h at [h*d, (h+1)*d)
    #   self_attn    the attention's write (before the residual add);  after_self = x + self_attn
    #   mlp          the MLP's write;  layer = after_self + mlp, the layer's output
    # projector layer 0: "layer" [I, D], the image features.

    def _layers(self, stream: str):
        return self._vision.encoder.layers if stream == "vision" else self._lm.layers

    def hook_point(self, site) -> tuple[torch.nn.Module, str]:
        """The module whose output (or input, for heads) holds a site's activation, as [B, P, W]."""
        if site.stream == "projector":
            return self.model.model.multi_modal_projector, "output"
        layer = self._layers(site.stream)[site.layer]
        if site.component == "layer":
            return layer, "output"
        if site.component == "mlp":
            return layer.mlp, "output"
        projection = layer.self_attn.out_proj if site.stream == "vision" else layer.self_attn.o_proj
        return projection, "input" if site.head is not None else "output"

    def site_columns(self, site) -> slice | None:
        """The columns of a (query) head's values before the output projection; None for whole components."""
        if site.head is None:
            return None
        d = self.streams[site.stream].head_dim
        return slice(site.head * d, (site.head + 1) * d)

    def num_positions(self, prompt: str) -> dict[str, int]:
        """How many positions each stream has for a question (sites' @position ranges)."""
        return {"vision": self.num_patches + 1, "projector": self.num_image_tokens, "lm": self.token_length(prompt)}

    def position_labels(self, run: Run) -> dict[str, list[str]]:
        grid = self.patch_grid[0]
        patches = [f"patch {i // grid},{i % grid}" for i in range(self.num_patches)]
        ids = run.inputs.input_ids[0]
        tokens = self.tokenizer.convert_ids_to_tokens(ids.tolist())
        span = self.image_positions(ids)
        image = patches if self.drop_cls else ["[CLS]"] + patches
        for offset, position in enumerate(span):
            tokens[position] = f"<image {image[offset]}>"
        return {"vision": ["[CLS]"] + patches, "projector": image, "lm": tokens}

    @torch.no_grad()
    def run_logits(self, run: Run) -> torch.Tensor:
        """The plain forward of a run, through transformers' own modules: [B, V] float32."""
        image, tokens = self._embeddings(run)
        embeds = self.merge(run.inputs.input_ids, tokens, self.encode_image(image_embeddings=image))
        return self.run_lm(embeds).float()

    def full_patch_sites(self, modality: str) -> list[str]:
        """Sites whose full patch (every position) turns the receiving run into the source run."""
        last = self.streams["lm"].layers - 1
        if modality == "image":
            return ["vision.0.layer@all", "projector.0.layer@all", f"lm.{last}.layer@all"]
        return ["lm.0.layer@all", f"lm.{last}.layer@all"]

    def cell_bytes(self, stream: str, num_positions: dict[str, int]) -> int:
        """A generous estimate of one patched cell's transient memory (for batch sizing)."""
        lm, vision = self.streams["lm"], self.streams["vision"]
        tokens = num_positions["lm"]
        text = self.model.config.text_config
        vocab = int(text.vocab_size)
        floats = 12 * tokens * lm.hidden + 3 * tokens * int(text.intermediate_size) + 3 * lm.heads * tokens * tokens
        floats += 4 * vocab + 2 * lm.layers * tokens * self.num_kv_heads * lm.head_dim
        if stream == "vision":
            images = num_positions["vision"]
            floats += 16 * images * vision.hidden + 3 * vision.heads * images * images
        return floats * max(self.dtype.itemsize, 4)

    def _rope(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, Q, d] for absolute positions [Q]."""
        return self._lm.rotary_emb(hidden, positions[None])

    def _keys_values(self, layer, normed: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Roped keys and values [B, KVH, Q, d] of one LM layer for its normed input [B, Q, D]."""
        attn = layer.self_attn
        shape = (*normed.shape[:2], -1, attn.head_dim)
        k = attn.k_proj(normed).view(shape).transpose(1, 2)
        v = attn.v_proj(normed).view(shape).transpose(1, 2)
        return _rotate(k, rope), v

    @torch.no_grad()
    def trace(self, run: Run, streams: set[str] | None = None) -> Trace:
        """The plain forward with hooks that keep every layer's intermediates (of `streams`; the LM's
        always) and each LM layer's roped keys and values, which patched runs reuse for their prefix."""
        streams = set(self.streams) if streams is None else set(streams) | {"lm"}
        acts: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        handles = []

        def add(module, store: dict, name: str, kind: str) -> None:
            if kind == "input":
                handles.append(module.register_forward_pre_hook(
                    lambda m, args: store.__setitem__(name, args[0][0].detach())))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, args, out: store.__setitem__(name, (out[0] if isinstance(out, tuple) else out)[0].detach())))

        for stream in ("vision", "lm"):
            if stream not in streams:
                continue
            for l, layer in enumerate(self._layers(stream)[:self.streams[stream].layers]):
                store = acts.setdefault((stream, l), {})
                attn = layer.self_attn
                projection = attn.out_proj if stream == "vision" else attn.o_proj
                add(layer, store, "x", "input")
                add(layer, store, "layer", "output")
                add(projection, store, "self_attn.z", "input")
                add(projection, store, "self_attn", "output")
                add(layer.mlp, store, "mlp", "output")
        projector: dict[str, torch.Tensor] = {}
        acts[("projector", 0)] = projector
        add(self.model.model.multi_modal_projector, projector, "layer", "output")
        try:
            logits = self.run_logits(run)[0]
        finally:
            for handle in handles:
                handle.remove()
        for store in acts.values():
            if "self_attn" in store:
                store["after_self"] = store["x"] + store["self_attn"]
        ids = run.inputs.input_ids[0]
        positions = torch.arange(ids.shape[0], device=ids.device)
        rope = self._rope(acts[("lm", 0)]["x"][None], positions)
        kv = [self._keys_values(layer, layer.input_layernorm(acts[("lm", l)]["x"][None]), rope)
              for l, layer in enumerate(self._lm.layers)]
        cache = {"kv": kv, "image_start": self.image_positions(ids).start, "input_ids": run.inputs.input_ids}
        if "vision" in streams:
            cache["vision_input"] = acts[("vision", 0)]["x"]
        counts = {"vision": self.num_patches + 1, "projector": self.num_image_tokens, "lm": int(ids.shape[0])}
        return Trace(logits=logits, acts=acts, cache=cache, num_positions=counts)

    @torch.no_grad()
    def patched_logits(self, receiving: Trace, source: Trace, batches: Sequence[PatchBatch] | PatchBatch) -> torch.Tensor:
        """Answer logits [N, V] of patched copies of the receiving run (N = cells of all batches, in order;
        they share one stream, and one layer unless the stream is in `cross_layer_streams`). The LM reruns
        only positions from the first one a patch can change, attending the receiving run's cached keys
        and values for the prefix before it, and each row only from the layer after its patched one."""
        batches = [batches] if isinstance(batches, PatchBatch) else list(batches)
        stream, layer = batches[0].stream, batches[0].layer
        assert all(b.stream == stream for b in batches), "one stream per call"
        assert stream in self.cross_layer_streams or all(b.layer == layer for b in batches), "one layer per call"
        first = min(int(b.positions.min()) for b in batches)
        if stream == "lm":
            entering: dict[int, list[torch.Tensor]] = {}
            for b in batches:
                entering.setdefault(b.layer + 1, []).append(self._patched_layer(receiving, source, b, first))
            logits = self._run_lm_from(receiving, {l: torch.cat(rows) for l, rows in entering.items()}, first)
            return logits[self._rows_in_given_order(batches)]
        if stream == "vision":
            hidden = torch.cat([self._patched_layer(receiving, source, b) for b in batches])  # [N, 1+P, Dv]
            for block in self._vision.encoder.layers[layer + 1:self.vision_layers_used]:
                hidden = block(hidden, None)
            features = self.project(hidden)  # [N, I, D]
            first = 0
        else:
            mine, theirs = receiving.acts[("projector", 0)]["layer"], source.acts[("projector", 0)]["layer"]
            features = torch.cat([self._scatter(mine.expand(len(b), -1, -1), b.positions, theirs, b.columns, mine)
                                  for b in batches])  # [N, I, D]
        image_start = receiving.cache["image_start"]
        lm_input = receiving.acts[("lm", 0)]["x"][None].repeat(features.shape[0], 1, 1)  # [N, T, D]
        lm_input[:, image_start:image_start + self.num_image_tokens] = features.to(lm_input.dtype)
        start = image_start + first
        return self._run_lm_from(receiving, {0: lm_input[:, start:]}, start)

    @staticmethod
    def _rows_in_given_order(batches: Sequence[PatchBatch]) -> torch.Tensor | slice:
        """_run_lm_from returns rows grouped by entering layer (stable); this index puts them back."""
        layers = [b.layer for b in batches for _ in range(len(b))]
        if layers == sorted(layers):
            return slice(None)
        return torch.argsort(torch.argsort(torch.tensor(layers), stable=True))

    @staticmethod
    def _scatter(base: torch.Tensor, index: torch.Tensor, source: torch.Tensor, columns: torch.Tensor | None,
                 mine: torch.Tensor) -> torch.Tensor:
        """base [N, P, W] with rows index [N, K] taken from source [P, W] (only `columns` [N, W] of them)."""
        value = source[index]  # [N, K, W]
        if columns is not None:
            value = torch.where(columns[:, None, :], value, mine[index])
        return base.clone().scatter_(1, index[..., None].expand(-1, -1, base.shape[-1]), value)

    def _patched_layer(self, receiving: Trace, source: Trace, batch: PatchBatch, start: int = 0) -> torch.Tensor:
        """The patched layer's output at positions start.. [N, P-start, W]: the receiving run's, with the
        patched rows recomputed position-wise from the patched target (nothing after the values mixes
        positions)."""
        key, target, index = (batch.stream, batch.layer), batch.target, batch.positions  # index [N, K]
        mine, theirs = receiving.acts[key], source.acts[key]
        value = theirs[target][index]  # [N, K, W]
        if batch.columns is not None:
            value = torch.where(batch.columns[:, None, :], value, mine[target][index])
        layer = self._layers(batch.stream)[batch.layer]
        if target == "layer":
            rows = value
        elif target == "mlp":
            rows = mine["after_self"][index] + value
        else:
            if target == "self_attn.z":
                projection = layer.self_attn.out_proj if batch.stream == "vision" else layer.self_attn.o_proj
                value = projection(value)
            after = mine["x"][index] + value
            norm = layer.layer_norm2 if batch.stream == "vision" else layer.post_attention_layernorm
            rows = after + layer.mlp(norm(after))
        out = mine["layer"][start:].expand(len(batch), -1, -1).clone()
        return out.scatter_(1, (index - start)[..., None].expand(-1, -1, out.shape[-1]), rows)

    def _run_lm_from(self, receiving: Trace, entering: dict[int, torch.Tensor], start: int) -> torch.Tensor:
        """Logits [N, V] of rows that enter the LM at the input of layer l (entering[l]: [n_l, Q, D], Q
        positions start..T-1; l = number of layers: after the last), run on from there; rows come out in
        order of l. Positions before `start` are the receiving run's: their cached keys and values serve
        as the prefix."""
        layers = self._lm.layers
        q = next(iter(entering.values())).shape[1]
        device = next(iter(entering.values())).device
        positions = torch.arange(start, start + q, device=device)
        rope = self._rope(entering[min(entering)], positions)
        causal = None if q == 1 else torch.ones(q, start + q, dtype=torch.bool, device=device).tril(diagonal=start)
        hidden = None
        for l in range(min(entering), len(layers) + 1):
            if l in entering:
                hidden = entering[l] if hidden is None else torch.cat([hidden, entering[l]])
            if l == len(layers):
                break
            layer, n = layers[l], hidden.shape[0]
            attn = layer.self_attn
            normed = layer.input_layernorm(hidden)
            shape = (n, q, -1, attn.head_dim)
            query = _rotate(attn.q_proj(normed).view(shape).transpose(1, 2), rope)  # [N, H, Q, d]
            k_new, v_new = self._keys_values(layer, normed, rope)  # [N, KVH, Q, d]
            k_prefix, v_prefix = (t[:, :, :start].expand(n, -1, -1, -1) for t in receiving.cache["kv"][l])
            keys = torch.cat([k_prefix, k_new], dim=2)  # [N, KVH, T, d]: query heads share them by group
            values = torch.cat([v_prefix, v_new], dim=2)
            z = F.scaled_dot_product_attention(query, keys, values, attn_mask=causal, scale=attn.scaling,
                                               enable_gqa=attn.num_key_value_groups > 1)
            hidden = hidden + attn.o_proj(z.transpose(1, 2).reshape(n, q, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.lm_head(self._lm.norm(hidden[:, -1])).float()


def _chat_prompt(processor, question: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def _prompt_ids(processor, question: str) -> list[int]:
    """The prompt's input ids as the language model reads them (the image expanded to its tokens)."""
    image = Image.new("RGB", (8, 8))
    encoded = processor(images=[image], text=[_chat_prompt(processor, question)], return_tensors="pt")
    return encoded["input_ids"][0].tolist()


def _rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE as Llama applies it: x [B, heads, Q, d] with cos, sin [1, Q, d]."""
    cos, sin = (t[:, None] for t in rope)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def four_bit_config(compute_dtype: torch.dtype):
    """bitsandbytes 4-bit (NF4) loading, an optional extra: `pip install notice[4bit]`."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise NoticeError("4-bit loading needs bitsandbytes, which is not installed: pip install 'notice[4bit]' "
                          "(CUDA only) or load in bfloat16") from error
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
