"""Gemma 3 (transformers' `Gemma3ForConditionalGeneration`, e.g. google/gemma-3-4b-it).

    pixel_values ──SigLIP tower (no [CLS]) + post-LayerNorm──▶ [B, 64×64 patches, Dv]
      ──projector: average pool to 16×16, RMSNorm, one matrix──▶ 256 image tokens [B, 256, D]
    <start_of_image> expanded to "\\n\\n<start_of_image>" + 256 image tokens + "<end_of_image>\\n\\n"
      ──Gemma 3 language model──▶ logits at the last position

Where Gemma 3 differs from LLaVA, and this adapter follows the model:
- an image block is bidirectional (transformers' token_type_ids): its tokens see one another, every
  other query is causal. A patch at an image position therefore changes the block's earlier
  positions from the next layer on, so reruns start at the block's first token (`rerun_start`).
- sliding-window layers (local rotary base) alternate with global layers (their own rotary base and
  scaling): masks and rotary tables are kept per layer type.
- embeddings are scaled by √width (text noise is scaled alike); RMSNorms of (1 + w); per-head q/k
  norms; a norm after the attention and after the MLP, whose outputs are the components' writes.
- no soft-capping: Gemma 3 configs set none, and `Gemma3ForConditionalGeneration` applies neither
  attention-logit nor final-logit soft-capping, so the fast path applies none either.
"""

from __future__ import annotations


import torch

from notice.errors import NoticeError
from notice.models.base import Run, StreamFacts, StreamMap
from notice.models.blocks import DecoderBlock
from notice.models.blocks.prenorm import Rope
from notice.models.image_tokens import ImageTokenAdapter, Prompt
from notice.models.llava import clip_block

STREAM_MAPS = {
    "vision": StreamMap("model.vision_tower.encoder.layers", writes={"self_attn": "self_attn.out_proj", "mlp": "mlp"},
                        heads={"self_attn": "self_attn.out_proj"}),
    "projector": StreamMap("model.multi_modal_projector", single=True),
    "lm": StreamMap("model.language_model.layers",
                    writes={"self_attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
                    heads={"self_attn": "self_attn.o_proj"}),
}
SLIDING = "sliding_attention"


def gemma_block(layer, heads: int, kv_heads: int) -> DecoderBlock:
    attn = layer.self_attn
    return DecoderBlock(out=attn.o_proj, attn_norm=layer.input_layernorm, attn_out_norm=layer.post_attention_layernorm,
                        mlp_norm=layer.pre_feedforward_layernorm, mlp=layer.mlp,
                        mlp_out_norm=layer.post_feedforward_layernorm, q_proj=attn.q_proj, k_proj=attn.k_proj,
                        v_proj=attn.v_proj, q_norm=attn.q_norm, k_norm=attn.k_norm, heads=heads, kv_heads=kv_heads,
                        head_dim=attn.head_dim, scale=attn.scaling)


class Gemma3Adapter(ImageTokenAdapter):
    family = "gemma3"
    model_class, processor_class = "Gemma3ForConditionalGeneration", "Gemma3Processor"
    lm_path = "model.language_model"
    first_patch = 0  # SigLIP has no [CLS]
    add_special_tokens = False  # the chat template writes <bos>

    def __init__(self, model, processor, name: str):
        super().__init__(model, processor, name)
        config = model.config
        vision, text = config.vision_config, config.text_config
        if processor.image_seq_length != config.mm_tokens_per_image:
            raise NoticeError(f"model {name!r}: its processor expands an image to {processor.image_seq_length} tokens "
                              f"but the model reads {config.mm_tokens_per_image}; save the model's own processor")
        if processor.image_processor.do_pan_and_scan:
            raise NoticeError(f"model {name!r}: its image processor cuts pan-and-scan crops, several image blocks per "
                              "image, which notice does not patch; save the processor with do_pan_and_scan=False")
        self.image_token_id = int(config.image_token_id)
        self.grid = vision.image_size // vision.patch_size
        self.side = int(config.mm_tokens_per_image ** 0.5)
        self.layer_types = list(text.layer_types)
        self.window = int(text.sliding_window)
        sliding = [l for l, kind in enumerate(self.layer_types) if kind == SLIDING]
        self.streams = {
            "vision": StreamFacts.of("vision", vision, ("layer", "self_attn", "mlp"), "patch",
                                     f"SigLIP vision tower over {self.grid}x{self.grid} patches (no [CLS]); every layer "
                                     "feeds the projector through the tower's post-LayerNorm"),
            "projector": StreamFacts("projector", 1, 0, 0, text.hidden_size, ("layer",), "image token",
                                     f"multimodal projector output: the patches average-pooled to {self.side}x"
                                     f"{self.side} = {self.image_token_count()} image tokens, RMS-normed, projected"),
            "lm": StreamFacts("lm", text.num_hidden_layers, text.num_attention_heads, text.head_dim, text.hidden_size,
                              ("layer", "self_attn", "mlp"), "token",
                              f"Gemma 3 language model over the prompt, image tokens included: causal, the image "
                              f"block bidirectional; layers {', '.join(map(str, sliding)) or 'none'} see a sliding "
                              f"window of {self.window} positions, the others every earlier position; grouped-query "
                              f"attention: {text.num_attention_heads} query heads share {text.num_key_value_heads} "
                              "key/value heads", reads_answer=True),
        }
        self.stream_maps = STREAM_MAPS
        self.blocks = {"vision": [clip_block(l) for l in self.tower.encoder.layers],
                       "lm": [gemma_block(l, text.num_attention_heads, text.num_key_value_heads)
                              for l in self.lm.layers]}

    @property
    def tower(self):
        return self.model.model.vision_tower

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        return self.grid, self.grid, self.model.config.vision_config.patch_size

    def image_token_count(self) -> int:
        return int(self.model.config.mm_tokens_per_image)

    def feature_grid(self, run: Run) -> tuple[int, int]:
        return self.side, self.side

    # ------------------------------------------------------------------- tower
    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings, [B, P, Dv]."""
        return self.tower.embeddings(pixel_values)

    def encode_image(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        hidden = image_embeddings
        for layer in self.tower.encoder.layers:
            hidden = layer(hidden, None)
        return self.project(hidden)

    def project(self, vision_states: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(self.tower.post_layernorm(vision_states))

    def vision_rerun(self, hidden: torch.Tensor, layer: int, cache: dict) -> torch.Tensor:
        for block in self.blocks["vision"][layer + 1:]:
            hidden = block.forward(hidden)
        return self.project(hidden)

    # -------------------------------------------------------------- the LM side
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.image_token_id >= self.lm.embed_tokens.num_embeddings:  # as the model: out-of-vocabulary → pad's row
            input_ids = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        return self.lm.embed_tokens(input_ids)

    def embedding_sigma(self, stream: str, embeddings: torch.Tensor) -> float:
        """Text noise scales with the embeddings the LM reads: the table's spread times √width."""
        if stream == "vision":
            return super().embedding_sigma(stream, embeddings)
        table = self.lm.embed_tokens
        return float(table.weight.detach().float().std()) * float(table.embed_scale.to(table.weight.dtype))

    def lm_hidden(self, embeddings: torch.Tensor, input_ids: torch.Tensor, prompt: Prompt) -> torch.Tensor:
        """The language model's own layers under Gemma 3's masks, given per layer type as additive masks
        (what transformers builds from token_type_ids, built here in a fraction of its time)."""
        length, masks = input_ids.shape[1], {}
        for kind in set(self.layer_types):
            window = self.window if kind == SLIDING else None
            allowed = torch.stack([block_mask(image_blocks((ids == self.image_token_id).nonzero().flatten(), length),
                                              0, length, window) for ids in input_ids])[:, None]  # [B, 1, T, T]
            masks[kind] = torch.zeros(allowed.shape, dtype=embeddings.dtype, device=embeddings.device).masked_fill(
                ~allowed, torch.finfo(embeddings.dtype).min)
        return self.lm(inputs_embeds=embeddings, attention_mask=masks, use_cache=False).last_hidden_state

    def rope(self, cache: dict, start: int, count: int, layer: int) -> Rope:
        """cos, sin of positions start.. for the layer's type (local and global layers rotate differently)."""
        kind = self.layer_types[layer]
        known = cache.setdefault("rope", {})
        if (kind, start, count) not in known:
            positions = torch.arange(start, start + count, device=self.device)[None]
            known[kind, start, count] = self.lm.rotary_emb(torch.empty(0, dtype=self.dtype, device=self.device),
                                                           positions, kind)
        return known[kind, start, count]

    def lm_mask(self, cache: dict, layer: int, start: int, count: int) -> torch.Tensor | None:
        """Causal, or within the image block; and within the window on sliding layers."""
        window = self.window if self.layer_types[layer] == SLIDING else None
        known = cache.setdefault("mask", {})
        if (window, start, count) not in known:
            known[window, start, count] = block_mask(image_blocks(cache["image_positions"], start + count), start,
                                                     count, window)
        return known[window, start, count]

    def rerun_start(self, cache: dict, position: int) -> int:
        """A patch inside an image block reaches the block's earlier tokens: rerun from its first token."""
        blocks = image_blocks(cache["image_positions"], position + 1)
        return position if blocks[position] < 0 else int((blocks == blocks[position]).nonzero()[0])


def image_blocks(image_positions: torch.Tensor, length: int) -> torch.Tensor:
    """Per position 0..length-1 the index of its image block (a run of consecutive image tokens), -1 for text."""
    positions = image_positions[image_positions < length]
    starts = torch.ones_like(positions)
    starts[1:] = (positions[1:] - positions[:-1] != 1).long()
    blocks = torch.full((length,), -1, dtype=torch.long, device=image_positions.device)
    blocks[positions] = torch.cumsum(starts, 0) - 1
    return blocks


def block_mask(blocks: torch.Tensor, start: int, count: int, window: int | None) -> torch.Tensor:
    """Which keys 0..start+count-1 each query start..start+count-1 sees, as Gemma 3 masks them: every
    earlier key and every key of its own image block, and on a sliding layer only keys less than
    `window` positions behind the query (future keys of the block stay visible)."""
    query = torch.arange(start, start + count, device=blocks.device)[:, None]
    key = torch.arange(start + count, device=blocks.device)[None]
    same_block = (blocks[query] == blocks[key]) & (blocks[query] >= 0)
    mask = (key <= query) | same_block
    if window is not None:
        mask &= key > query - window
    return mask
