"""Qwen2-VL and Qwen2.5-VL (transformers' `Qwen2VLForConditionalGeneration` and
`Qwen2_5_VLForConditionalGeneration`, e.g. Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct).

    image, resized to multiples of patch × merge px (28) within the processor's pixel range
      ──flattened patches [gh·gw, 3·2·14·14]──ViT with 2-D rotary positions──▶ [gh·gw, Dv]
        (Qwen2.5-VL: patches regrouped window by window; attention inside each window except on
        its full-attention layers)
      ──patch merger (each 2×2 block of patches → one token)──▶ image features [gh·gw/4, D]
    <|image_pad|> expanded to gh·gw/4 tokens ──Qwen2 LM with multimodal rotary positions──▶ logits

The number of image tokens depends on the image: prompts are batched by (length, grid) and a pair's
two images must give one grid. The LM's rotary positions are 3-D (temporal, row, column) from the
model's own `get_rope_index`: image tokens share one temporal position and the text after the image
continues from the largest, so positions are not 0..T-1. The tower runs on [P, Dv] without a batch
dimension; its position rows are the patches in the tower's order, which their labels name.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from notice.errors import NoticeError
from notice.models.base import Run, StreamFacts, StreamMap, Trace, mask_patch_positions
from notice.models.blocks import EncoderBlock
from notice.models.blocks.prenorm import Rope
from notice.models.image_tokens import ImageTokenAdapter, Prompt
from notice.models.llava import llama_block

STREAM_MAPS = {
    "vision": StreamMap("model.visual.blocks", writes={"self_attn": "attn", "mlp": "mlp"},
                        heads={"self_attn": "attn.proj"}),
    "projector": StreamMap("model.visual.merger", single=True),
    "lm": StreamMap("model.language_model.layers", writes={"self_attn": "self_attn.o_proj", "mlp": "mlp"},
                    heads={"self_attn": "self_attn.o_proj"}),
}
REFERENCE_IMAGE = (448, 448)  # (height, width) whose image-token count `notice info` reports


def tower_block(block) -> EncoderBlock:
    attn = block.attn  # qkv: one projection, [q | k | v] each head-major
    return EncoderBlock(out=attn.proj, mlp_norm=block.norm2, mlp=block.mlp, attn_norm=block.norm1,
                        qkv=lambda x: attn.qkv(x).chunk(3, dim=-1), heads=attn.num_heads, scale=attn.scaling)


def segment_mask(bounds: torch.Tensor, count: int) -> torch.Tensor | None:
    """Attention inside segments [bounds[i], bounds[i+1]) of `count` positions as [count, count] bool;
    None for one segment (every position sees every other)."""
    inner = [int(b) for b in bounds if 0 < int(b) < count]
    if not inner:
        return None
    segment = torch.bucketize(torch.arange(count, device=bounds.device), torch.tensor(inner, device=bounds.device),
                              right=True)
    return segment[:, None] == segment[None, :]


class Qwen2VLAdapter(ImageTokenAdapter):
    family = "qwen2_vl"
    lm_path = "model.language_model"
    first_patch = 0  # no [CLS]: every vision position is a patch
    fixed_image_tokens = False
    model_class = "Qwen2VLForConditionalGeneration"
    processor_class = "Qwen2VLProcessor"

    def __init__(self, model, processor, name: str):
        super().__init__(model, processor, name)
        config = model.config
        vision, text = config.vision_config, config.text_config
        sliding = [i for i, kind in enumerate(text.layer_types) if kind != "full_attention"]
        if sliding:
            raise NoticeError(f"model {name!r} has sliding-window layers {sliding}: notice reads Qwen2-VL language "
                              "models with full attention (use_sliding_window: false, as every released checkpoint)")
        images = processor.image_processor
        self.merge_size, self.patch = int(vision.spatial_merge_size), int(vision.patch_size)
        if (images.patch_size, images.merge_size) != (self.patch, self.merge_size):
            raise NoticeError(f"model {name!r}: its processor cuts {images.patch_size} px patches merged by "
                              f"{images.merge_size}, its vision tower reads {self.patch} px patches merged by "
                              f"{self.merge_size}; save the processor that belongs to the model")
        self.image_token_id = int(config.image_token_id)
        attn = self.tower.blocks[0].attn
        heads, kv_heads = text.num_attention_heads, int(text.num_key_value_heads or text.num_attention_heads)
        lm_attn = self.lm.layers[0].self_attn
        rows, cols, _ = self.patch_grid
        tokens = self.image_token_count()
        height, width = REFERENCE_IMAGE
        self.streams = {
            "vision": StreamFacts("vision", len(self.tower.blocks), attn.num_heads, attn.head_dim, attn.dim,
                                  ("layer", "self_attn", "mlp"), "patch",
                                  f"ViT over {self.patch} px patches with 2-D rotary positions ({rows}x{cols} for a "
                                  f"{height}x{width} image){self.tower_note()}; positions in the tower's order"),
            "projector": StreamFacts("projector", 1, 0, 0, text.hidden_size, ("layer",), "image token",
                                     f"patch merger: one token per {self.merge_size}x{self.merge_size} patches, as "
                                     f"many as the image gives ({tokens} for a {height}x{width} image)"),
            "lm": StreamFacts("lm", text.num_hidden_layers, heads, lm_attn.head_dim, text.hidden_size,
                              ("layer", "self_attn", "mlp"), "token",
                              f"causal language model with multimodal rotary positions (M-RoPE) over the prompt, "
                              f"image tokens included; grouped-query attention: {heads} query heads share "
                              f"{kv_heads} key/value heads", reads_answer=True),
        }
        self.stream_maps = STREAM_MAPS
        self.blocks = {"vision": [tower_block(b) for b in self.tower.blocks],
                       "lm": [llama_block(l, heads, kv_heads) for l in self.lm.layers]}

    @property
    def tower(self):
        return self.model.model.visual

    def tower_note(self) -> str:
        return ""

    # ----------------------------------------------------------------- loading
    @classmethod
    def nominal_image(cls, processor) -> Image.Image:
        """A REFERENCE_IMAGE-sized image: token_length counts its image tokens (each image has its own)."""
        height, width = REFERENCE_IMAGE
        return Image.new("RGB", (width, height))

    @classmethod
    def load_processor(cls, source: str | Path):
        import transformers
        from transformers.utils import is_torchvision_available

        family = getattr(transformers, cls.processor_class)
        return (family if is_torchvision_available() else image_only(family)).from_pretrained(str(source))

    # ------------------------------------------------------------------- grids
    def grid_of(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of patches of an image of this size after the processor's resizing."""
        images = self.processor.image_processor
        size = images.size
        rows, cols = smart_resize(height, width, self.patch * self.merge_size, size["shortest_edge"],
                                  size["longest_edge"])
        return rows // self.patch, cols // self.patch

    def image_grid(self, image: Image.Image) -> tuple[int, int]:
        return self.grid_of(image.height, image.width)

    @staticmethod
    def run_grid(run: Run) -> tuple[int, int]:
        _, rows, cols = run.inputs.image_grid_thw[0].tolist()
        return int(rows), int(cols)

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        """The patch grid of a REFERENCE_IMAGE-sized image (each image has its own: `run_grid`)."""
        return (*self.grid_of(*REFERENCE_IMAGE), self.patch)

    def image_token_count(self) -> int:
        rows, cols, _ = self.patch_grid
        return rows * cols // self.merge_size ** 2

    def input_length(self, image: Image.Image, question: str) -> int:
        """The positions a question's prompt takes with this image (token_length counts REFERENCE_IMAGE's)."""
        rows, cols = self.image_grid(image)
        return self.token_length(question) - self.image_token_count() + rows * cols // self.merge_size ** 2

    def image_key(self, image: Image.Image) -> tuple[int, int]:
        return self.image_grid(image)

    def unit_order(self, grid: tuple[int, int]) -> torch.Tensor:
        """The merged units (raster index over the grid of merge × merge blocks) in the tower's order."""
        return torch.arange(grid[0] * grid[1] // self.merge_size ** 2)

    def patch_order(self, grid: tuple[int, int]) -> list[tuple[int, int]]:
        """(row, column) of each position of the tower, in its order: merged unit by unit, each unit's
        patches row-major."""
        m, cols = self.merge_size, grid[1] // self.merge_size
        return [((unit // cols) * m + inner // m, (unit % cols) * m + inner % m)
                for unit in self.unit_order(grid).tolist() for inner in range(m * m)]

    # ------------------------------------------------------------------ inputs
    def prepare(self, images, questions):
        """Processor inputs for one batch; the images must give one grid (see `image_key`)."""
        encoded = super().prepare(images, questions)
        if len({tuple(g) for g in encoded["image_grid_thw"].tolist()}) > 1:
            raise ValueError("images of one batch must give one patch grid; use batches_by_length with the images")
        return encoded

    def runs_for(self, clean_image, corrupt_image, clean_prompt: str, corrupt_prompt: str,
                 noise: dict[str, Any] | None = None) -> tuple[Run, Run]:
        grids = self.image_grid(clean_image), self.image_grid(corrupt_image)
        if grids[0] != grids[1]:
            (a, b), (c, d) = grids
            tokens = [rows * cols // self.merge_size ** 2 for rows, cols in grids]
            raise NoticeError(f"the clean image ({clean_image.width}x{clean_image.height} px) gives a {a}x{b} patch "
                              f"grid and the corrupt image ({corrupt_image.width}x{corrupt_image.height} px) a {c}x{d} "
                              f"one ({tokens[0]} and {tokens[1]} image tokens): a pair's images must give one grid; "
                              "resize both to one size")
        return super().runs_for(clean_image, corrupt_image, clean_prompt, corrupt_prompt, noise)

    def grid_positions(self, image_positions: torch.Tensor) -> torch.Tensor:
        return image_positions.sort().values

    def feature_grid(self, run: Run) -> tuple[int, int]:
        rows, cols = self.run_grid(run)
        return rows // self.merge_size, cols // self.merge_size

    def num_positions(self, run: Run) -> dict[str, int]:
        rows, cols = self.run_grid(run)
        return {"vision": rows * cols, "projector": rows * cols // self.merge_size ** 2,
                "lm": int(run.inputs.input_ids.shape[1])}

    def position_labels(self, run: Run) -> dict[str, list[str]]:
        grid = self.run_grid(run)
        cols = grid[1] // self.merge_size
        units = [f"patch {u // cols},{u % cols}" for u in self.unit_order(grid).tolist()]  # merged coordinates
        ids = run.inputs.input_ids[0]
        tokens = self.tokenizer.convert_ids_to_tokens(ids.tolist())
        for label, position in zip(units, self.projector_positions(run).tolist()):
            tokens[position] = f"<image {label}>"
        return {"vision": [f"patch {r},{c}" for r, c in self.patch_order(grid)], "projector": units, "lm": tokens}

    def projector_positions(self, run: Run) -> torch.Tensor:
        """The LM positions of the merger's rows, in their (the tower's) order."""
        lm_order = self.image_positions(run.inputs.input_ids[0])
        return lm_order[self.unit_order(self.run_grid(run)).to(lm_order.device)]

    def run_cache(self, run: Run) -> dict:
        return dict(super().run_cache(run), image_positions=self.projector_positions(run),
                    mrope=self.lm_position_ids(run.inputs)[:, :1])

    def lm_position_ids(self, inputs) -> torch.Tensor:
        """M-RoPE position ids [3, B, T] of prepared inputs, by the model's own `get_rope_index`."""
        return self.model.model.get_rope_index(inputs.input_ids, image_grid_thw=inputs.image_grid_thw,
                                               mm_token_type_ids=inputs.mm_token_type_ids)[0]

    def rope_positions(self, cache: dict, start: int, count: int) -> torch.Tensor:
        return cache["mrope"][:, :, start:start + count]

    # ------------------------------------------------------------------- noise
    def resolve_noise(self, spec: dict[str, Any], prompt: str, run: Run, mask=None) -> dict[str, Any]:
        """Image positions index the patch embeddings, merged unit by unit (the processor's order)."""
        if spec["stream"] != "vision":
            return super().resolve_noise(spec, prompt, run, mask)
        rows, cols = self.run_grid(run)
        if spec["positions"] == "all":
            return dict(spec, positions=list(range(rows * cols)))
        if spec["positions"] != "object":
            return dict(spec, positions=list(spec["positions"]))
        if mask is None:
            raise NoticeError("image noise on the 'object' needs the pair's clean_mask")
        m = self.merge_size
        raster = [divmod(i, cols) for i in mask_patch_positions(mask, (rows, cols), first_patch=0)]
        return dict(spec, positions=sorted(((r // m) * (cols // m) + c // m) * m * m + (r % m) * m + c % m
                                           for r, c in raster))

    # ------------------------------------------------------------------ stages
    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch embeddings [P, Dv] of flattened patches [P, 3·t·p·p] (the processor's packed layout)."""
        return self.tower.patch_embed(pixel_values)

    def embed_images(self, inputs) -> torch.Tensor:
        """[B, P, Dv]: each image's patch embeddings (one grid per batch), merged unit by unit."""
        embeddings = self.embed_image(inputs.pixel_values)
        return embeddings.view(len(inputs.image_grid_thw), -1, embeddings.shape[-1])

    def encode_image(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Refused: the tower's rotary positions and windows need each image's grid, which embeddings
        alone do not carry; the contract calls `encode_images` with the prepared inputs."""
        raise NoticeError("Qwen2-VL's tower needs each image's grid: use encode_images(inputs, embeddings)")

    def encode_images(self, inputs, image_embeddings: torch.Tensor) -> torch.Tensor:
        """The model's own tower and merger on these patch embeddings: image features [B, I, D] in the
        LM's order."""
        flat = image_embeddings.reshape(-1, image_embeddings.shape[-1])
        handle = self.tower.patch_embed.register_forward_hook(lambda _module, _args, _output: flat, prepend=True)
        try:
            out = self.model.model.get_image_features(inputs.pixel_values, inputs.image_grid_thw)
        finally:
            handle.remove()
        return torch.cat(out.pooler_output).view(image_embeddings.shape[0], -1, self.streams["lm"].hidden)

    def lm_prompt(self, inputs, token_embeddings: torch.Tensor, image_states: torch.Tensor) -> Prompt:
        return super().lm_prompt(inputs, token_embeddings, image_states)._replace(positions=self.lm_position_ids(inputs))

    def lm_hidden(self, embeddings: torch.Tensor, input_ids: torch.Tensor, prompt: Prompt) -> torch.Tensor:
        """The LM under the prompt's M-RoPE positions; the answer's tokens after the prompt continue one by
        one after its largest position (as in generation)."""
        assert prompt.positions is not None, "Qwen2-VL prompts carry their M-RoPE positions"
        extra = torch.arange(input_ids.shape[1] - prompt.positions.shape[2], device=input_ids.device)
        after = prompt.positions.amax(dim=(0, 2))[:, None] + 1 + extra
        positions = torch.cat([prompt.positions, after[None].expand(3, -1, -1)], dim=2)
        return self.lm(inputs_embeds=embeddings, position_ids=positions, use_cache=False).last_hidden_state

    # ---------------------------------------------------------------- patching
    def trace(self, run: Run, streams: set[str] | None = None) -> Trace:
        """The plain trace, plus what the tower's layers read besides their input: rotary tables of the
        patches and which patches attend to which, as the model itself passed them."""
        seen: list[dict] = []
        handles = [block.register_forward_pre_hook(lambda _module, _args, kwargs: seen.append(kwargs),
                                                   with_kwargs=True) for block in self.tower.blocks]
        try:
            trace = super().trace(run, streams)
        finally:
            for handle in handles:
                handle.remove()
        count = trace.num_positions["vision"]
        cos, sin = seen[0]["position_embeddings"]
        trace.cache["vision_rope"] = (cos[None].float(), sin[None].float())
        trace.cache["vision_masks"] = [segment_mask(kwargs["cu_seqlens"], count) for kwargs in seen]
        return trace

    def vision_context(self, cache: dict, layer: int, count: int) -> tuple[Rope, torch.Tensor | None]:
        return cache["vision_rope"], cache["vision_masks"][layer]

    def vision_rerun(self, hidden: torch.Tensor, layer: int, cache: dict) -> torch.Tensor:
        for l in range(layer + 1, len(self.blocks["vision"])):
            hidden = self.blocks["vision"][l].forward(hidden, *self.vision_context(cache, l, hidden.shape[1]))
        n, count, width = hidden.shape
        return self.tower.merger(hidden.reshape(n * count, width)).view(n, count // self.merge_size ** 2, -1)


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: Qwen2-VL with an RMSNorm, gated-MLP tower whose patches are regrouped window by window
    (windows of `window_size` px) and attend within their window except on `fullatt_block_indexes`."""

    family = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    processor_class = "Qwen2_5_VLProcessor"

    def tower_note(self) -> str:
        vision = self.model.config.vision_config
        full = ", ".join(map(str, vision.fullatt_block_indexes))
        return f", attention inside {vision.window_size} px windows except on layers {full}"

    def unit_order(self, grid: tuple[int, int]) -> torch.Tensor:
        """Window by window (row-major), each window's merged units row-major; the last row and column
        of windows may be smaller."""
        vision = self.model.config.vision_config
        side = vision.window_size // self.merge_size // self.patch  # merged units per window side
        units = torch.arange(grid[0] * grid[1] // self.merge_size ** 2).view(grid[0] // self.merge_size, grid[1] // self.merge_size)
        return torch.cat([units[r:r + side, c:c + side].flatten() for r in range(0, units.shape[0], side)
                          for c in range(0, units.shape[1], side)])


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size Qwen2-VL's image processor resizes an image to: each side a multiple of `factor`,
    the area within [min_pixels, max_pixels], the aspect ratio kept as closely as that allows."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as processors_own

    return processors_own(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


@functools.lru_cache(maxsize=None)
def image_only(processor_class: Any) -> Any:
    """The family's processor without a video processor: transformers builds that one only where
    torchvision is installed, and notice reads images only. Saved under the family's own name."""
    class ImageOnly(processor_class):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__
    return ImageOnly


__all__ = ["Qwen25VLAdapter", "Qwen2VLAdapter"]
