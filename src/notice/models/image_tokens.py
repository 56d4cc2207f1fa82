"""What decoder-only VLMs share: a causal language model reading image tokens in its own sequence.

    pixel_values ──vision tower──▶ vision states ──projector──▶ image features [B, I, D]
    input_ids, image placeholders expanded to I tokens whose embeddings become the features
      ──language model (causal, rotary positions, grouped-query attention)──▶ logits at the last position

Streams: `vision` (the tower's layers that feed the projector), `projector` (one layer: the image
features, positions 0..I-1) and `lm` (positions index the expanded input ids). A head of
`lm.L.self_attn.headH` is a query head: its values before the output projection, so patching one
query head never touches the keys or values its group shares. Patched LM rows rerun only from the
first position a patch can change, over the receiving run's cached keys and values before it, and
each row from the layer after its own patch (cells of every layer share one call).
A family supplies its tower (`encode_image`, `vision_rerun`), paths and prompt template; and, where it
differs from LLaVA: an image whose size decides its token count (`nominal_image`, `image_key`,
`image_geometry`), how the projector's rows become image tokens (`pack_features`,
`first_image_position`), its rotary positions, masks and forward (`rope_positions`, `rope`, `lm_mask`,
`lm_prompt`, `lm_hidden`), what reruns keep (`run_cache`) and where a rerun must start (`rerun_start`).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar, NamedTuple, Sequence

import torch
from PIL import Image

from notice.errors import NoticeError
from notice.models.base import ImageAttention, ModelAdapter, PatchBatch, Run, Trace, check_batch, grid_labels
from notice.models.blocks.attention import AttentionInputs
from notice.models.blocks.prenorm import Rope, causal_mask
from notice.models.blocks.rows import rows_in_given_order, run_entering_rows


class Prompt(NamedTuple):
    """What the LM reads of a prompt: its input embeddings [B, T, D], ids [B, T] and, in a family whose
    rotary positions are not 0..T-1, their position ids (Qwen2-VL's M-RoPE: [3, B, T])."""

    embeddings: torch.Tensor
    input_ids: torch.Tensor
    positions: torch.Tensor | None = None


class ImageTokenAdapter(ModelAdapter):
    cross_layer_streams = frozenset({"lm"})
    answer_batch_size = 16
    add_special_tokens: ClassVar[bool] = True  # False where the chat template writes BOS itself (Gemma 3)
    fixed_image_tokens: ClassVar[bool] = True  # False where the image's size decides its token count
    chat_prompts: ClassVar[bool] = True  # False where prompts are a fixed format, not the chat template (BLIP-2)
    image_token_id: int
    lm_path: str  # the language model's decoder (embed_tokens, layers, norm, rotary_emb)

    def __init__(self, model, processor, name: str):
        super().__init__(model, processor, name)
        if self.chat_prompts and processor.chat_template is None:
            raise NoticeError(f"model {name!r} has a processor without a chat template: save one with the processor "
                              f"({self.family} prompts are built by the chat template)")

    @property
    def lm(self):
        return self.model.get_submodule(self.lm_path)

    @property
    def word_embeddings(self) -> torch.nn.Embedding:
        return self.lm.embed_tokens

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM's norm after its last layer, before the head."""
        return self.lm.norm(hidden)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations run in (4-bit weights compute in the embeddings' dtype)."""
        return self.lm.embed_tokens.weight.dtype

    # ----------------------------------------------------------------- prompts
    def prompt(self, question: str) -> str:
        return chat_prompt(self.processor, question)

    @classmethod
    def prompt_ids(cls, processor, question: str) -> list[int]:
        """The expanded ids of a question's prompt with the family's `nominal_image`."""
        encoded = processor(images=[[cls.nominal_image(processor)]], text=[chat_prompt(processor, question)],
                            return_tensors="pt", add_special_tokens=cls.add_special_tokens)
        return encoded["input_ids"][0].tolist()

    @classmethod
    def nominal_image(cls, processor) -> Image.Image:
        """An image whose prompt is as long as any (every image expands alike in most families)."""
        return Image.new("RGB", (8, 8))

    def prepare(self, images: Sequence[Image.Image], questions: Sequence[str]):
        """Processor inputs for one batch; the prompts must tokenize to one length."""
        check_batch(images, questions)
        encoded = self.processor(images=[[image] for image in images], text=[self.prompt(q) for q in questions],
                                 return_tensors="pt", padding=True, add_special_tokens=self.add_special_tokens)
        if not bool(encoded["attention_mask"].all()):
            raise ValueError("prompts of one batch must have the same token length; use batches_by_length")
        encoded = encoded.to(self.device).to(self.dtype)
        self.image_positions(encoded["input_ids"][0])  # checks the expansion once per batch
        return encoded

    def _prompt_offsets(self, question: str, run: Run | None = None) -> tuple[list[tuple[int, int]], int, int]:
        """Character spans of the unexpanded prompt's tokens, where the question starts in it, and how
        many positions the image placeholders add in `run` (the question follows the image)."""
        prompt = self.prompt(question)
        encoded = self.tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=self.add_special_tokens)
        length = self.token_length(question) if run is None else int(run.inputs.input_ids.shape[1])
        return encoded["offset_mapping"], prompt.rindex(question), length - len(encoded["input_ids"])

    def question_positions(self, question: str) -> list[int]:
        """Positions of the tokens that spell the question within the full prompt."""
        offsets, begin, shift = self._prompt_offsets(question)
        end = begin + len(question)
        return [i + shift for i, (a, b) in enumerate(offsets) if b > a and a < end and b > begin]

    def prompt_positions(self, question: str, positions: Sequence[int], run: Run | None = None) -> list[int]:
        """Positions of the question tokenized alone (special tokens included) in the full prompt,
        matched by the characters they cover, after the image placeholders are expanded."""
        alone = self.tokenizer(question, return_offsets_mapping=True)["offset_mapping"]
        spans = [alone[p] for p in positions if alone[p][1] > alone[p][0]]
        offsets, begin, shift = self._prompt_offsets(question, run)
        return [i + shift for i, (a, b) in enumerate(offsets)
                if b > a and any(a - begin < end and b - begin > start for start, end in spans)]

    # --------------------------------------------------------------- positions
    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The LM positions holding image features, in feature order, of one prompt's ids [T]."""
        where = (input_ids == self.image_token_id).nonzero().flatten()
        if len(where) == 0:
            raise NoticeError("the prompt holds no image tokens: put exactly one image in the prompt")
        if self.fixed_image_tokens and len(where) != self.image_token_count():
            raise NoticeError(f"the prompt holds {len(where)} image tokens, not {self.image_token_count()}: "
                              "put exactly one image in the prompt")
        return where

    def text_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The LM positions holding text tokens (template and question) of one prompt's ids [T]."""
        return (input_ids != self.image_token_id).nonzero().flatten()

    def answer_position(self, input_ids: torch.Tensor) -> int:
        """The last prompt position: its output is the answer's first token."""
        return int(input_ids.shape[-1]) - 1

    def num_positions(self, run: Run) -> dict[str, int]:
        rows, cols, _ = self.patch_grid
        return {"vision": self.vision_positions(), "projector": self.image_token_count(),
                "lm": int(run.inputs.input_ids.shape[1])}

    def vision_span(self, positions: int) -> int:
        """How many of an image's `positions` vision positions one of them attends to: all of them, unless
        the tower reads tiles (LLaVA-NeXT)."""
        return positions

    def vision_positions(self) -> int:
        rows, cols, _ = self.patch_grid
        return self.first_patch + rows * cols  # [CLS] (where the tower has one) + patches

    def position_labels(self, run: Run) -> dict[str, list[str]]:
        rows, cols, _ = self.patch_grid
        ids = run.inputs.input_ids[0]
        tokens = self.tokenizer.convert_ids_to_tokens(ids.tolist())
        features = self.feature_labels(run)
        for feature, position in zip(features, self.image_positions(ids).tolist()):
            tokens[position] = f"<image {feature}>"
        return {"vision": ["[CLS]"] * self.first_patch + grid_labels(rows, cols), "projector": features, "lm": tokens}

    def feature_labels(self, run: Run) -> list[str]:
        return grid_labels(*self.feature_grid(run))

    def feature_grid(self, run: Run) -> tuple[int, int]:
        """(rows, columns) of the grid that the image tokens of `grid_positions` tile over the whole image,
        row-major (heatmaps, head-function overlays)."""
        rows, cols, _ = self.patch_grid
        return rows, cols

    # ------------------------------------------------------------------ stages
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.embed_tokens(input_ids)

    def merge(self, input_ids: torch.Tensor, token_embeddings: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The LM's input [B, T, D]: token embeddings with the image features at the image positions."""
        mask = (input_ids == self.image_token_id)[..., None]
        return token_embeddings.masked_scatter(mask, features.to(token_embeddings.dtype))

    def lm_prompt(self, inputs, token_embeddings: torch.Tensor, image_states: torch.Tensor) -> Prompt:
        """What the LM reads of prepared inputs: the token embeddings with the image states (the projector's
        rows, packed into image tokens) at the image positions."""
        features = self.pack_features(image_states, self.image_geometry(inputs))
        return Prompt(self.merge(inputs.input_ids, token_embeddings, features), inputs.input_ids)

    def logits_from_states(self, inputs, image_states: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
        return self.answer_step_logits(self.lm_prompt(inputs, token_embeddings, image_states),
                                       inputs.input_ids[:, :0])[:, 0]

    def answer_context(self, inputs) -> Prompt:
        return self.lm_prompt(inputs, self.embed_tokens(inputs.input_ids),
                              self.encode_images(inputs, self.embed_images(inputs)))

    def answer_step_logits(self, prompt: Prompt, prefix: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1 + K, V] of the answer steps after the prompt and a prefix [B, K]."""
        embeds = torch.cat([prompt.embeddings, self.embed_tokens(prefix)], dim=1)
        hidden = self.lm_hidden(embeds, torch.cat([prompt.input_ids, prefix], dim=1), prompt)
        return self.lm_head(hidden[:, -(prefix.shape[1] + 1):])

    def lm_hidden(self, embeddings: torch.Tensor, input_ids: torch.Tensor, prompt: Prompt) -> torch.Tensor:
        """The language model's own forward over a prompt and the answer so far: its last hidden states
        [B, T, D] (ids tell where images are; `prompt` holds the prompt's own position ids, if any)."""
        return self.lm(inputs_embeds=embeddings, use_cache=False).last_hidden_state

    def image_geometry(self, inputs) -> Any:
        """What besides the projector's rows decides an input's image-token features (None in most families)."""
        return None

    def pack_features(self, projected: torch.Tensor, geometry: Any) -> torch.Tensor:
        """The image-token features [N, I, D] from the projector's rows [N, P, D] (the same rows in most
        families; tiles are unpadded and interleaved with newlines in LLaVA-NeXT)."""
        return projected

    def first_image_position(self, cache: dict, positions: torch.Tensor) -> int:
        """The first LM position that a change at the projector's rows `positions` can reach: those rows'
        own image tokens (cache["image_positions"] in the projector's order), unless packing mixes rows."""
        return int(cache["image_positions"][positions].min())

    # ------------------------------------------------------------ the LM's facts
    def rope(self, cache: dict, start: int, count: int, layer: int) -> Rope:
        """cos, sin [1, count, d] of positions start..start+count-1 for a layer (the same for every layer:
        computed once per span and kept in the run's cache)."""
        known = cache.setdefault("rope", {})
        if (start, count) not in known:
            positions = self.rope_positions(cache, start, count)
            known[start, count] = self.lm.rotary_emb(torch.empty(0, dtype=self.dtype, device=self.device), positions)
        return known[start, count]

    def rope_positions(self, cache: dict, start: int, count: int) -> torch.Tensor:
        """Rotary position ids of positions start..start+count-1: plain [1, count]; a family with
        multimodal positions (Qwen2-VL's M-RoPE, [3, 1, count]) reads them from the run's cache."""
        return torch.arange(start, start + count, device=self.device)[None]

    def lm_mask(self, cache: dict, layer: int, start: int, count: int) -> torch.Tensor | None:
        """Which keys each rerun query sees (causal), kept in the run's cache per span."""
        known = cache.setdefault("mask", {})
        if (start, count) not in known:
            known[start, count] = causal_mask(start, count, self.device)
        return known[start, count]

    def rerun_start(self, cache: dict, position: int) -> int:
        """The first position a patch at `position` can change (later positions only, in a causal LM)."""
        return position

    # ---------------------------------------------------------------- patching
    def traced_streams(self, streams: set[str]) -> set[str]:
        return set(streams) | {"lm", "projector"}

    def run_cache(self, run: Run) -> dict:
        """What reruns of a run need before its keys and values: "image_positions", the LM positions of
        the image tokens in the order `pack_features` writes them, and the image's "geometry" (a family
        adds its position ids, masks, tower facts)."""
        return {"image_positions": self.image_positions(run.inputs.input_ids[0]),
                "geometry": self.image_geometry(run.inputs)}

    def trace_cache(self, run: Run, acts, kept) -> dict:
        """Each LM layer's rotated keys and values [1, KVH, T, d]: the prefix of every rerun."""
        ids = run.inputs.input_ids[0]
        cache = self.run_cache(run)
        cache["kv"] = [block.keys_values(block.attn_norm(acts[("lm", l)]["x"][None]), self.rope(cache, 0, len(ids), l))
                       for l, block in enumerate(self.blocks["lm"])]
        return cache

    @torch.no_grad()
    def patched_logits(self, receiving: Trace, source: Trace, batches: Sequence[PatchBatch]) -> torch.Tensor:
        stream, layer = batches[0].stream, batches[0].layer
        assert all(b.stream == stream for b in batches), "one stream per call"
        assert stream in self.cross_layer_streams or all(b.layer == layer for b in batches), "one layer per call"
        if stream == "lm":
            first = self.rerun_start(receiving.cache, min(int(b.positions.min()) for b in batches))
            entering: dict[int, list[torch.Tensor]] = {}
            for b in batches:
                entering.setdefault(b.layer + 1, []).append(self.patched_layer(receiving, source, b, first))
            logits = self.run_lm_from(receiving, {l: torch.cat(rows) for l, rows in entering.items()}, first)
            return logits[rows_in_given_order(batches)]
        if stream == "vision":
            hidden = torch.cat([self.patched_layer(receiving, source, b) for b in batches])
            return self.logits_from_features(receiving, self.vision_rerun(hidden, layer, receiving.cache))
        projected = torch.cat([self.patched_layer(receiving, source, b) for b in batches])
        return self.logits_from_features(receiving, projected,
                                         min(self.first_image_position(receiving.cache, b.positions) for b in batches))

    def logits_from_features(self, receiving: Trace, projected: torch.Tensor, first: int | None = None) -> torch.Tensor:
        """Logits [N, V] of the receiving run with the projector's rows [N, P, D] in place of its own (packed
        into image-token features by `pack_features`), the LM rerun from the first position that LM position
        `first` can change (None: the first image token)."""
        image_positions = receiving.cache["image_positions"]
        features = self.pack_features(projected, receiving.cache["geometry"])
        lm_input = receiving.acts[("lm", 0)]["x"][None].repeat(features.shape[0], 1, 1)  # [N, T, D]
        lm_input[:, image_positions] = self.lm_entry(features, image_positions).to(lm_input.dtype)
        start = self.rerun_start(receiving.cache, int(image_positions.min()) if first is None else first)
        return self.run_lm_from(receiving, {0: lm_input[:, start:]}, start)

    def lm_entry(self, features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """What the LM's first layer reads at image positions for these features: the features themselves
        (rotary positions act inside the layers; learned positions would be added here)."""
        return features

    def run_lm_from(self, receiving: Trace, entering: dict[int, torch.Tensor], start: int) -> torch.Tensor:
        """Logits [N, V] of rows entering the LM at the input of layer l (entering[l]: [n_l, Q, D] at positions
        start..T-1; l = the number of layers: after the last), rows coming out in order of l."""
        blocks, cache = self.blocks["lm"], receiving.cache
        count = next(iter(entering.values())).shape[1]

        def layer(l: int, hidden: torch.Tensor) -> torch.Tensor:
            prefix = tuple(t[:, :, :start] for t in cache["kv"][l])
            return blocks[l].forward(hidden, self.rope(cache, start, count, l), prefix, self.lm_mask(cache, l, start, count))

        hidden = run_entering_rows(entering, len(blocks), layer)
        return self.lm_head(self.final_norm(hidden[:, -1])).float()

    @abstractmethod
    def vision_rerun(self, hidden: torch.Tensor, layer: int, cache: dict) -> torch.Tensor:
        """The projector's rows [N, P, D] from the vision stream's rows [N, Pv, Dv] after layer `layer`;
        cache: the receiving run's (rotary tables and masks of a tower that has them)."""

    def vision_context(self, cache: dict, layer: int, count: int) -> tuple[Rope | None, torch.Tensor | None]:
        """What a vision layer's attention reads besides its input, for one image's `count` positions:
        rotary tables and which positions see which (None, None: plain full attention, as CLIP and SigLIP)."""
        return None, None

    def attention_inputs(self, trace: Trace, stream: str, layer: int, component: str) -> AttentionInputs:
        x = trace.acts[(stream, layer)]["x"]
        if stream == "vision":
            return self.blocks["vision"][layer].attention_inputs(x, *self.vision_context(trace.cache, layer, len(x)))
        if stream != "lm":
            return super().attention_inputs(trace, stream, layer, component)
        count = trace.num_positions["lm"]
        return self.blocks["lm"][layer].attention_inputs(x, self.rope(trace.cache, 0, count, layer),
                                                         self.lm_mask(trace.cache, layer, 0, count))

    def full_patch_sites(self, modality: str) -> list[str]:
        last = self.streams["lm"].layers - 1
        if modality == "image":
            return ["vision.0.layer@all", "projector.0.layer@all", f"lm.{last}.layer@all"]
        return ["lm.0.layer@all", f"lm.{last}.layer@all"]

    def cell_bytes(self, stream: str, num_positions: dict[str, int]) -> int:
        lm, vision = self.streams["lm"], self.streams["vision"]
        tokens = num_positions["lm"]
        mlp = self.blocks["lm"][0].mlp
        inner = max(m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear))
        kv_heads = self.blocks["lm"][0].kv_heads
        floats = 12 * tokens * lm.hidden + 3 * tokens * inner + 3 * lm.heads * tokens * tokens
        floats += 4 * self.vocab_size + 2 * lm.layers * tokens * kv_heads * lm.head_dim
        if stream == "vision":
            images = num_positions["vision"]
            floats += 16 * images * vision.hidden + 3 * vision.heads * images * self.vision_span(images)
        return floats * max(self.dtype.itemsize, 4)

    # ---------------------------------------------------------- head functions
    @torch.no_grad()
    def image_attention(self, image: Image.Image, question: str, answer: str) -> ImageAttention:
        """LM self-attention to the image tokens of the grid, read at the last prompt position, where
        the answer is read out."""
        run = Run(self.prepare([image], [question]))
        trace = self.trace(run, {"lm"})
        count = trace.num_positions["lm"]
        grid = self.grid_positions(trace.cache["image_positions"])
        weights = torch.stack([block.attention_weights(trace.acts[("lm", l)]["x"][None],
                                                       self.rope(trace.cache, 0, count, l),
                                                       self.lm_mask(trace.cache, l, 0, count))[0][..., grid]
                               for l, block in enumerate(self.blocks["lm"])])  # [L, H, T, I]
        return ImageAttention("lm", "self_attn", weights, trace.acts[("lm", 0)]["x"][grid].float(), count - 1,
                              self.feature_grid(run))

    def grid_positions(self, image_positions: torch.Tensor) -> torch.Tensor:
        """The LM positions of the image tokens that are grid patches, row-major."""
        return image_positions


def chat_prompt(processor, question: str) -> str:
    """The question in the model's chat template, one image before it, ending where the answer starts."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)
