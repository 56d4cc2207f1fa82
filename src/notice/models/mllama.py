"""Llama-3.2-Vision (transformers' `MllamaForConditionalGeneration`, e.g. meta-llama/Llama-3.2-11B-Vision-Instruct).

    pixel_values [B, 1, tiles, 3, S, S] ──patches, [CLS], tile and position embeddings──▶ [B, tiles·(1+P+pad), Dv]
      ──local encoder (`vision`; the outputs of `intermediate_layers_indices` are kept)──▶ LayerNorm, tile embedding
      ──gated global encoder (`vision_global`)──▶ padding dropped, ⊕ the kept outputs ──projector──▶
      image states [B, M, D]   (M = tiles·(1+P): the memory the text reads; it has no positions in the text)
    prompt (one <|image|> token, never expanded) ──Llama decoder──▶ logits at the last position; the layers at
      `cross_attention_layers` attend the image states instead of the prompt, their writes tanh-gated

Streams: `vision` (the local encoder over every tile's [CLS], patches and padding), `vision_global` (the
global encoder; gated writes) and `lm` (positions: the prompt's tokens). `lm` offers `cross_attn` on its
cross-attention layers and `self_attn` on the others; a head is a query head's values before the output
projection, its grouped key/value head shared as in LLaVA; a gated write is patched before its gate (a
constant of the model). Corrupting the image reaches the text only through the cross-attention keys and
values: a patch in `lm` reads them from the receiving run's cache, a patch in the tower recomputes them
per cell. Rows before the image token attend every image token alike (transformers' mask) and add no
MLP write in the cross-attention layers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from notice.errors import NoticeError
from notice.models.base import (ImageAttention, ModelAdapter, PatchBatch, Run, StreamFacts, StreamMap, Trace,
                                check_batch, grid_labels, mask_patch_positions)
from notice.models.blocks import DecoderBlock, EncoderBlock
from notice.models.blocks.attention import AttentionInputs
from notice.models.blocks.gated_cross import GatedCrossBlock
from notice.models.blocks.prenorm import Rope, causal_mask
from notice.models.blocks.rows import rows_in_given_order, run_entering_rows

VISION_WRITES = {"self_attn": "self_attn.o_proj", "mlp": "mlp"}
STREAM_MAPS = {
    "vision": StreamMap("model.vision_model.transformer.layers", writes=VISION_WRITES,
                        heads={"self_attn": "self_attn.o_proj"}),
    "vision_global": StreamMap("model.vision_model.global_transformer.layers", writes=VISION_WRITES,
                               heads={"self_attn": "self_attn.o_proj"}),
    "lm": StreamMap("model.language_model.layers",
                    writes={"self_attn": "self_attn.o_proj", "cross_attn": "cross_attn.o_proj", "mlp": "mlp"},
                    heads={"self_attn": "self_attn.o_proj", "cross_attn": "cross_attn.o_proj"}),
}


def vision_block(layer) -> EncoderBlock:
    """A vision encoder layer; the global encoder's gate both writes."""
    attn = layer.self_attn
    gates = dict(attn_gate=layer.gate_attn, mlp_gate=layer.gate_ffn) if layer.is_gated else {}
    return EncoderBlock(out=attn.o_proj, mlp_norm=layer.post_attention_layernorm, mlp=layer.mlp,
                        attn_norm=layer.input_layernorm, qkv=lambda x: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)),
                        heads=attn.num_heads, scale=attn.scaling, **gates)


def self_block(layer) -> DecoderBlock:
    attn = layer.self_attn
    return DecoderBlock(out=attn.o_proj, mlp_norm=layer.post_attention_layernorm, mlp=layer.mlp,
                        attn_norm=layer.input_layernorm, q_proj=attn.q_proj, k_proj=attn.k_proj, v_proj=attn.v_proj,
                        heads=attn.num_heads, kv_heads=attn.num_key_value_heads, head_dim=attn.head_dim,
                        scale=attn.scaling)


def cross_block(layer) -> GatedCrossBlock:
    attn = layer.cross_attn
    return GatedCrossBlock(out=attn.o_proj, mlp_norm=layer.post_attention_layernorm, mlp=layer.mlp,
                           attn_gate=layer.cross_attn_attn_gate, mlp_gate=layer.cross_attn_mlp_gate,
                           attn_norm=layer.input_layernorm, q_proj=attn.q_proj, k_proj=attn.k_proj,
                           v_proj=attn.v_proj, q_norm=attn.q_norm, k_norm=attn.k_norm, heads=attn.num_heads,
                           kv_heads=attn.num_key_value_heads, head_dim=attn.head_dim, scale=attn.scaling)


def prompt_text(processor, question: str) -> str:
    """The question after one image, in the chat template where the checkpoint has one (the Instruct
    models), else as the base models read it: `<|image|><|begin_of_text|>question`."""
    if processor.chat_template is None:
        return f"{processor.image_token}{processor.tokenizer.bos_token}{question}"
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


class MllamaAdapter(ModelAdapter):
    family = "mllama"
    model_class, processor_class = "MllamaForConditionalGeneration", "MllamaProcessor"
    cross_layer_streams = frozenset({"lm"})
    answer_batch_size = 16
    trace_outputs = {"image_states": "model.multi_modal_projector"}

    def __init__(self, model, processor, name: str):
        super().__init__(model, processor, name)
        config = model.config
        vision, text = config.vision_config, config.text_config
        self.image_token_id = int(config.image_token_index)
        self.tiles = int(vision.max_num_tiles)
        if processor.image_processor.max_image_tiles != self.tiles:
            raise NoticeError(f"model {name!r}: its processor cuts images into up to "
                              f"{processor.image_processor.max_image_tiles} tiles but the vision model reads "
                              f"{self.tiles}: save the checkpoint's own processor with it")
        self.grid = vision.image_size // vision.patch_size
        self.tile_tokens = self.grid * self.grid + 1  # [CLS] + patches: what the text reads of each tile
        self.padded = self.tile_tokens + (8 - self.tile_tokens % 8) % 8  # the tower pads each tile to 8k
        self.kept = tuple(int(i) for i in vision.intermediate_layers_indices)
        self.cross_layers = tuple(int(i) for i in text.cross_attention_layers)
        self_layers = tuple(l for l in range(text.num_hidden_layers) if l not in self.cross_layers)
        positions = self.tiles * self.padded
        kv_heads = int(text.num_key_value_heads)
        encoder = ("layer", "self_attn", "mlp")
        self.streams = {
            "vision": StreamFacts("vision", vision.num_hidden_layers, vision.attention_heads,
                                  vision.hidden_size // vision.attention_heads, vision.hidden_size, encoder, "patch",
                                  f"local vision encoder over {positions} positions ({self.tiles} tile(s) of [CLS] + "
                                  f"{self.grid}x{self.grid} patches, padded to {self.padded}); the outputs of layers "
                                  f"{', '.join(map(str, self.kept))} reach the text directly"),
            "vision_global": StreamFacts("vision_global", vision.num_global_layers, vision.attention_heads,
                                         vision.hidden_size // vision.attention_heads, vision.hidden_size, encoder,
                                         "patch", "global vision encoder over the same positions; tanh-gated writes"),
            "lm": StreamFacts("lm", text.num_hidden_layers, text.num_attention_heads,
                              text.hidden_size // text.num_attention_heads, text.hidden_size,
                              ("layer", "self_attn", "cross_attn", "mlp"), "token",
                              f"Llama decoder over the prompt; layers {', '.join(map(str, self.cross_layers))} attend "
                              f"the {self.image_token_count()} image states instead (tanh-gated writes); "
                              f"grouped-query attention: {text.num_attention_heads} query heads share {kv_heads} "
                              "key/value heads", reads_answer=True,
                              layers_of={"self_attn": self_layers, "cross_attn": self.cross_layers}),
        }
        self.stream_maps = STREAM_MAPS
        self.blocks = {
            "vision": [vision_block(l) for l in self.vision.transformer.layers],
            "vision_global": [vision_block(l) for l in self.vision.global_transformer.layers],
            "lm": [cross_block(l) if i in self.cross_layers else self_block(l) for i, l in enumerate(self.lm.layers)],
        }

    @property
    def vision(self):
        return self.model.model.vision_model

    @property
    def lm(self):
        return self.model.model.language_model

    @classmethod
    def prompt_ids(cls, processor, question: str) -> list[int]:
        """The prompt's ids as the language model reads them (the image token is one position)."""
        return processor.tokenizer(prompt_text(processor, question), add_special_tokens=False)["input_ids"]

    @property
    def word_embeddings(self) -> torch.nn.Embedding:
        return self.lm.embed_tokens

    @property
    def vocab_size(self) -> int:
        """The answer vocabulary: the LM head's rows (the embeddings hold the image token beyond it)."""
        return int(self.model.lm_head.weight.shape[0])

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        return self.grid, self.grid, self.model.config.vision_config.patch_size

    def image_token_count(self) -> int:
        return self.tiles * self.tile_tokens

    # ----------------------------------------------------------------- prompts
    def prompt(self, question: str) -> str:
        return prompt_text(self.processor, question)

    def prepare(self, images: Sequence[Image.Image], questions: Sequence[str]):
        """Processor inputs for one batch, one image per prompt; the prompts must tokenize to one length."""
        check_batch(images, questions)
        image_token = self.processor.image_token
        held = next((q for q in questions if image_token in q), None)
        if held is not None:
            raise NoticeError(f"question {held!r} holds {image_token}: notice gives Llama-3.2-Vision one image per "
                              f"prompt, before the question; drop {image_token} from it")
        encoded = self.processor(images=[[image] for image in images], text=[self.prompt(q) for q in questions],
                                 return_tensors="pt", padding=True, add_special_tokens=False)
        if not bool(encoded["attention_mask"].all()):
            raise ValueError("prompts of one batch must have the same token length; use batches_by_length")
        return encoded.to(self.device).to(self.dtype)  # floats only: ids and masks stay integers

    def prompt_positions(self, question: str, positions: Sequence[int], run: Run | None = None) -> list[int]:
        """Positions of the question tokenized alone (special tokens included) in the full prompt, matched
        by the characters they cover."""
        alone = self.tokenizer(question, return_offsets_mapping=True)["offset_mapping"]
        spans = [alone[p] for p in positions if alone[p][1] > alone[p][0]]
        prompt = self.prompt(question)
        begin = prompt.rindex(question)
        offsets = self.tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        return [i for i, (a, b) in enumerate(offsets)
                if b > a and any(a - begin < end and b - begin > start for start, end in spans)]

    # --------------------------------------------------------------- positions
    def num_positions(self, run: Run) -> dict[str, int]:
        count = self.tiles * self.padded
        return {"vision": count, "vision_global": count, "lm": int(run.inputs.input_ids.shape[1])}

    def position_labels(self, run: Run) -> dict[str, list[str]]:
        tile = ["[CLS]"] + grid_labels(self.grid, self.grid) + [f"pad {k}" for k in range(self.padded - self.tile_tokens)]
        vision = tile if self.tiles == 1 else [f"tile {t} {label}" for t in range(self.tiles) for label in tile]
        return {"vision": vision, "vision_global": vision,
                "lm": self.tokenizer.convert_ids_to_tokens(run.inputs.input_ids[0].tolist())}

    def tile_layout(self, aspect_ratio_id: int) -> tuple[int, int]:
        """(tile rows, tile columns) of an image's canvas, from its aspect-ratio id."""
        from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

        return get_all_supported_aspect_ratios(self.tiles)[aspect_ratio_id - 1]

    def image_patches(self, aspect_ratio_id: int, image_size: tuple[int, int]) -> tuple[int, int, torch.Tensor]:
        """The patches that show an image of `image_size` (height, width): (rows, columns, tile-relative index
        [rows·columns] of each patch in row-major order, 1 + patch within its tile + tile·(tokens per tile) with
        tokens per tile still to be chosen by the caller: see `image_index`). The processor scales an image
        into its tiles' canvas and pads it right and below; the patches of padding are left out."""
        from transformers.models.mllama.image_processing_pil_mllama import get_image_size_fit_to_canvas

        tiles_down, tiles_across = self.tile_layout(aspect_ratio_id)
        size = self.model.config.vision_config.image_size
        height, width = get_image_size_fit_to_canvas(image_size[0], image_size[1], tiles_down * size,
                                                     tiles_across * size, size)
        patch = self.patch_grid[2]
        rows, cols = -(-height // patch), -(-width // patch)
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        tile = (r // self.grid) * tiles_across + c // self.grid
        return rows, cols, torch.stack([tile, 1 + (r % self.grid) * self.grid + c % self.grid]).flatten(1)

    def image_index(self, aspect_ratio_id: int, image_size: tuple[int, int], per_tile: int) -> tuple[int, int, list[int]]:
        """(rows, columns, positions) of an image's patches in a sequence of `per_tile` positions per tile
        (the towers': `padded`; the image states: `tile_tokens`)."""
        rows, cols, where = self.image_patches(aspect_ratio_id, image_size)
        return rows, cols, (where[0] * per_tile + where[1]).tolist()

    # ------------------------------------------------------------------- noise
    def resolve_noise(self, spec: dict, prompt: str, run: Run, mask: np.ndarray | None = None) -> dict:
        """Image noise goes on the patches that show the image ("all") or its object ("object"), in the
        tower's positions; text noise as every family's."""
        if spec["stream"] != "vision":
            return super().resolve_noise(spec, prompt, run, mask)
        ratio = int(run.inputs.aspect_ratio_ids[0, 0])
        if spec["positions"] == "object":
            if mask is None:
                raise NoticeError("image noise on the 'object' needs the pair's clean_mask")
            rows, cols, index = self.image_index(ratio, mask.shape, self.padded)
            return dict(spec, positions=[index[i] for i in mask_patch_positions(mask, (rows, cols), first_patch=0)])
        if spec["positions"] == "all":
            height, width = self.model.config.vision_config.image_size, self.model.config.vision_config.image_size
            tiles_down, tiles_across = self.tile_layout(ratio)
            return dict(spec, positions=self.image_index(ratio, (tiles_down * height, tiles_across * width),
                                                         self.padded)[2])
        return dict(spec, positions=list(spec["positions"]))

    def embedding_sigma(self, stream: str, embeddings: torch.Tensor) -> float:
        """Image noise scale: the std of the first tile's patch embeddings ([CLS] and padding excluded)."""
        if stream == "vision":
            return float(embeddings[:, 1:self.tile_tokens].float().std())
        return super().embedding_sigma(stream, embeddings)

    # ------------------------------------------------------------------ stages
    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise TypeError("the Llama-3.2-Vision tower reads each image's tile layout too: use embed_images(inputs)")

    def encode_image(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        raise TypeError("the Llama-3.2-Vision tower reads each image's tile layout too: use encode_images(inputs, ...)")

    def embed_images(self, inputs) -> torch.Tensor:
        """The local encoder's input [B, tiles·padded, Dv]: patches, [CLS], tile and position embeddings,
        LayerNorm, each tile padded (transformers' MllamaVisionModel, step by step)."""
        vision, ratio = self.vision, inputs.aspect_ratio_ids
        batch, images, tiles, channels, height, width = inputs.pixel_values.shape
        if images != 1:
            raise NoticeError(f"{images} images per prompt: notice patches Llama-3.2-Vision with one image per prompt")
        pixels = inputs.pixel_values.reshape(batch * tiles, channels, height, width)
        hidden = vision.patch_embedding(pixels.to(vision.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        hidden = vision.pre_tile_positional_embedding(hidden.reshape(batch, tiles, -1, hidden.shape[-1]), ratio)
        hidden = vision.apply_class_embedding(hidden.reshape(batch * tiles, -1, hidden.shape[-1]))
        hidden = vision.gated_positional_embedding(hidden.reshape(batch, tiles, self.tile_tokens, -1), ratio)
        hidden = F.pad(vision.layernorm_pre(hidden), (0, 0, 0, self.padded - self.tile_tokens))
        return hidden.reshape(batch, tiles * self.padded, -1)

    def tower_mask(self, inputs) -> torch.Tensor:
        """The towers' additive attention mask [B, 1, S, S]: padding and unused tiles attend only real patches."""
        from transformers.models.mllama.modeling_mllama import _prepare_aspect_ratio_attention_mask

        return _prepare_aspect_ratio_attention_mask(inputs.aspect_ratio_mask.reshape(inputs.aspect_ratio_mask.shape[0], -1),
                                                    self.vision.num_patches, self.padded, self.dtype)

    def encode_images(self, inputs, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Image states [B, M, D] from the local encoder's input, through the tower's own layers."""
        mask, hidden, kept = self.tower_mask(inputs), image_embeddings, {}
        for l, layer in enumerate(self.vision.transformer.layers):
            hidden = kept[l] = layer(hidden, attention_mask=mask)
        hidden = self.global_input(hidden, inputs.aspect_ratio_ids)
        for layer in self.vision.global_transformer.layers:
            hidden = layer(hidden, attention_mask=mask)
        return self.image_states(hidden, [kept[l] for l in self.kept])

    def global_input(self, local: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """The global encoder's input: the local encoder's output [N, S, Dv], LayerNorm, tile embedding."""
        n, count, width = local.shape
        hidden = self.vision.layernorm_post(local).reshape(n, self.tiles, self.padded, width)
        return self.vision.post_tile_positional_embedding(hidden, aspect_ratio_ids).reshape(n, count, width)

    def image_states(self, global_out: torch.Tensor, kept: Sequence[torch.Tensor]) -> torch.Tensor:
        """What the text reads [N, M, D]: each tile's unpadded global output and kept local outputs (stacked as
        transformers does), projected."""
        n, width = global_out.shape[0], global_out.shape[-1]
        final = global_out.reshape(n, self.tiles, self.padded, width)
        local = torch.stack(list(kept), dim=-1).reshape(n, self.tiles, self.padded, -1)
        states = torch.cat([final, local], dim=-1)[:, :, :self.tile_tokens]
        return self.model.model.multi_modal_projector(states).reshape(n, self.image_token_count(), -1)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.embed_tokens(input_ids)

    def logits_from_states(self, inputs, image_states: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
        return self.answer_step_logits((token_embeddings, image_states, inputs.cross_attention_mask),
                                       inputs.input_ids[:, :0])[:, 0]

    def answer_context(self, inputs):
        image_states = self.encode_images(inputs, self.embed_images(inputs))
        return self.embed_tokens(inputs.input_ids), image_states, inputs.cross_attention_mask

    def answer_step_logits(self, context, prefix: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1 + K, V] after the prompt and a teacher-forced prefix [B, K]; the prefix sees the image
        as the prompt's last token does (as `generate` extends the mask)."""
        prompt, image_states, cross_mask = context
        steps = prefix.shape[1]
        cross_mask = torch.cat([cross_mask, cross_mask[:, -1:].expand(-1, steps, -1, -1)], dim=1)
        hidden = self.model.model(inputs_embeds=torch.cat([prompt, self.embed_tokens(prefix)], dim=1),
                                  cross_attention_states=image_states, cross_attention_mask=cross_mask,
                                  use_cache=False).last_hidden_state
        return self.model.lm_head(hidden[:, -(steps + 1):])

    # ---------------------------------------------------------------- patching
    def cross_mask(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Row 0's additive cross-attention mask [T, M] and which rows see an image [T, 1] (transformers')."""
        from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

        mask, keep = _prepare_cross_attention_mask(inputs.cross_attention_mask[:1], self.tile_tokens,
                                                   self.dtype)  # type: ignore[arg-type]  # typed str, used as a dtype
        return mask[0, 0], keep[0, 0]

    def traced_streams(self, streams: set[str]) -> set[str]:
        """The LM always (its inputs are where reruns enter); the local encoder's kept outputs for global reruns."""
        return set(streams) | {"lm"} | ({"vision"} if "vision_global" in streams else set())

    def trace_cache(self, run: Run, acts, kept) -> dict:
        """The image states, each LM layer's keys and values (rotated prompt keys, or the image's), the
        cross-attention mask, and the towers' mask and tile layout for reruns."""
        cache: dict = {"image_states": kept["image_states"].reshape(self.image_token_count(), -1)}
        cache["cross_mask"], cache["keep"] = self.cross_mask(run.inputs)
        count = int(run.inputs.input_ids.shape[1])
        cache["kv"] = []
        for l, block in enumerate(self.blocks["lm"]):
            if l in self.cross_layers:
                acts[("lm", l)]["keep"] = cache["keep"]
                cache["kv"].append(block.memory(cache["image_states"][None]))
            else:
                cache["kv"].append(block.keys_values(block.attn_norm(acts[("lm", l)]["x"][None]),
                                                     self.rope(cache, 0, count)))
        cache["tower_mask"] = self.tower_mask(run.inputs)[0, 0]
        cache["aspect_ratio_ids"] = run.inputs.aspect_ratio_ids[:1]
        return cache

    def rope(self, cache: dict, start: int, count: int) -> Rope:
        """cos, sin [1, count, d] of positions start..start+count-1, kept in the run's cache per span."""
        known = cache.setdefault("rope", {})
        if (start, count) not in known:
            positions = torch.arange(start, start + count, device=self.device)[None]
            known[start, count] = self.lm.rotary_emb(torch.empty(0, dtype=self.dtype, device=self.device), positions)
        return known[start, count]

    def causal(self, cache: dict, start: int, count: int) -> torch.Tensor | None:
        known = cache.setdefault("causal", {})
        if (start, count) not in known:
            known[start, count] = causal_mask(start, count, self.device)
        return known[start, count]

    @torch.no_grad()
    def patched_logits(self, receiving: Trace, source: Trace, batches: Sequence[PatchBatch]) -> torch.Tensor:
        """LM patches rerun from the first patched position, each row from the layer after its patch, over
        the receiving run's cached prompt keys/values and image keys/values; tower patches rerun the tower
        and then the LM from its first cross-attention layer, every position, reading each cell's image."""
        stream, layer = batches[0].stream, batches[0].layer
        assert all(b.stream == stream for b in batches), "one stream per call"
        assert stream == "lm" or all(b.layer == layer for b in batches), "one layer per call"
        if stream == "lm":
            first = min(int(b.positions.min()) for b in batches)
            entering: dict[int, list[torch.Tensor]] = {}
            for b in batches:
                entering.setdefault(b.layer + 1, []).append(self.patched_layer(receiving, source, b, first))
            logits = self.run_lm_from(receiving, {l: torch.cat(rows) for l, rows in entering.items()}, first)
            return logits[rows_in_given_order(batches)]
        hidden = torch.cat([self.patched_layer(receiving, source, b) for b in batches])  # [N, S, Dv]
        states = self.tower_rerun(receiving, stream, layer, hidden)
        entry = self.cross_layers[0]
        lm_input = receiving.acts[("lm", entry)]["x"][None].expand(len(states), -1, -1)
        return self.run_lm_from(receiving, {entry: lm_input}, 0, states)

    def tower_rerun(self, receiving: Trace, stream: str, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Image states [N, M, D] from a tower stream's rows [N, S, Dv] after layer `layer`."""
        cells, mask = hidden.shape[0], receiving.cache["tower_mask"]
        kept = {l: receiving.acts[("vision", l)]["layer"][None].expand(cells, -1, -1) for l in self.kept}
        if stream == "vision":
            kept[layer] = hidden
            for l in range(layer + 1, self.streams["vision"].layers):
                hidden = kept[l] = self.blocks["vision"][l].forward(hidden, mask=mask)
            hidden = self.global_input(hidden, receiving.cache["aspect_ratio_ids"].expand(cells, -1))
            layer = -1
        for block in self.blocks["vision_global"][layer + 1:]:
            hidden = block.forward(hidden, mask=mask)
        return self.image_states(hidden, [kept[l] for l in self.kept])

    def run_lm_from(self, receiving: Trace, entering: dict[int, torch.Tensor], start: int,
                    image_states: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N, V] of rows entering the LM at the input of layer l (entering[l]: [n_l, Q, D] at positions
        start..T-1), rows coming out in order of l; image_states [N, M, D]: each row's own image (else the
        receiving run's cached keys and values)."""
        cache, blocks = receiving.cache, self.blocks["lm"]
        count = next(iter(entering.values())).shape[1]

        def layer(l: int, hidden: torch.Tensor) -> torch.Tensor:
            block = blocks[l]
            if isinstance(block, GatedCrossBlock):
                memory = cache["kv"][l] if image_states is None else block.memory(image_states)
                return block.forward(hidden, memory, cache["cross_mask"][start:], cache["keep"][start:])
            prefix = tuple(t[:, :, :start] for t in cache["kv"][l])
            return block.forward(hidden, self.rope(cache, start, count), prefix, self.causal(cache, start, count))

        hidden = run_entering_rows(entering, len(blocks), layer)
        return self.model.lm_head(self.lm.norm(hidden[:, -1])).float()

    def attention_inputs(self, trace: Trace, stream: str, layer: int, component: str) -> AttentionInputs:
        """The towers' heads read every position but padding and unused tiles; the LM's self-attention heads
        the prompt (causal, rotary), its cross-attention heads the image states (the model's mask)."""
        block, x = self.blocks[stream][layer], trace.acts[(stream, layer)]["x"]
        if isinstance(block, EncoderBlock):
            return block.attention_inputs(x, mask=trace.cache["tower_mask"] == 0)
        if isinstance(block, GatedCrossBlock):
            return block.cross_inputs(x, trace.cache["image_states"], trace.cache["cross_mask"])
        count = trace.num_positions["lm"]
        return block.attention_inputs(x, self.rope(trace.cache, 0, count), self.causal(trace.cache, 0, count))

    def full_patch_sites(self, modality: str) -> list[str]:
        last = self.streams["lm"].layers - 1
        if modality == "image":  # the prompt is shared: the image is the only difference
            return ["vision.0.layer@all", f"lm.{last}.layer@all"]
        return ["lm.0.layer@all", f"lm.{last}.layer@all"]

    def cell_bytes(self, stream: str, num_positions: dict[str, int]) -> int:
        lm, vision = self.streams["lm"], self.streams["vision"]
        tokens, memory = num_positions["lm"], self.image_token_count()
        inner = self.model.config.text_config.intermediate_size
        kv = self.model.config.text_config.num_key_value_heads * lm.head_dim
        # hidden states and MLP activations, self- and cross-attention scores, logits, prompt keys/values
        floats = 12 * tokens * lm.hidden + 3 * tokens * inner + 3 * lm.heads * tokens * (tokens + memory)
        floats += 4 * self.vocab_size + 2 * lm.layers * tokens * kv
        if stream != "lm":  # a whole tower, its attention scores, and fresh image keys/values per cross layer
            positions = num_positions[stream]
            floats += 16 * positions * vision.hidden + 3 * vision.heads * positions * positions
            floats += memory * (vision.hidden * (2 + len(self.kept)) + lm.hidden + 2 * len(self.cross_layers) * kv)
        return floats * max(self.dtype.itemsize, 4)

    # ---------------------------------------------------------- head functions
    @torch.no_grad()
    def image_attention(self, image: Image.Image, question: str, answer: str) -> ImageAttention:
        """The cross-attention layers' heads' attention to the patches that show the image, read at the last
        prompt position, where the answer is read out."""
        run = Run(self.prepare([image], [question]))
        trace = self.trace(run, {"lm"})
        states, mask = trace.cache["image_states"], trace.cache["cross_mask"]
        rows, cols, index = self.image_index(int(run.inputs.aspect_ratio_ids[0, 0]), (image.height, image.width),
                                             self.tile_tokens)
        weights = torch.stack([self.blocks["lm"][l].attention_weights(trace.acts[("lm", l)]["x"][None], states[None],
                                                                      mask)[0][..., index]
                               for l in self.cross_layers])  # [cross layers, H, T, patches]
        return ImageAttention("lm", "cross_attn", weights, states[index].float(), trace.num_positions["lm"] - 1,
                              (rows, cols), layers=self.cross_layers)

    def describe(self) -> dict:
        """The facts, and each gate's tanh as the model has it (0 hides a write: a fresh model's cross-attention)."""
        def tanh(gate: torch.nn.Parameter) -> float:
            return round(float(gate.detach().tanh()), 4)

        gates = {f"lm.{l}": {"cross_attn": tanh(self.lm.layers[l].cross_attn_attn_gate),
                             "mlp": tanh(self.lm.layers[l].cross_attn_mlp_gate)} for l in self.cross_layers}
        gates.update({f"vision_global.{l}": {"self_attn": tanh(layer.gate_attn), "mlp": tanh(layer.gate_ffn)}
                      for l, layer in enumerate(self.vision.global_transformer.layers)})
        return {**super().describe(), "gates": gates}
