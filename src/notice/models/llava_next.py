"""LLaVA-NeXT (transformers' `LlavaNextForConditionalGeneration`, e.g. llava-hf/llava-v1.6-mistral-7b-hf):
LLaVA with "anyres" images, and the base of LLaVA-OneVision (llava_onevision.py).

    image ──the processor──▶ a base tile (the whole image, resized) + the tiles of the best grid of
      `image_grid_pinpoints` (resized to fit, padded): pixel_values [B, tiles, 3, S, S]
    each tile ──vision tower──▶ ──projector──▶ [tiles, P, D]
      ──the model's pack_image_features: base tokens, then the tiles' tokens as one canvas, padding
        cut away (unpad), a learned image_newline after each of its rows──▶ I image tokens
    <image> expanded to those I tokens ──language model──▶ logits at the last position

How many image tokens an image takes depends on its size (its best grid and its aspect ratio), so:
positions come from each input's ids and image sizes; batches group images of one size
(`image_key`); a pair's clean and corrupt images must give the same tiles and tokens (`runs_for`
says which pair and why not); `token_length` is the longest a prompt can be (an image of the
pinpoint that expands most). The tower reads an image's tiles as rows of its batch: the `vision`
and `projector` streams index (tile, position) flattened, base tile first (`stream_rows`). Head
functions and heatmaps read the base tile's tokens, a grid over the whole image.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from PIL import Image

from notice.errors import NoticeError
from notice.models.base import Run, grid_labels, mask_patch_positions
from notice.models.llava import LlavaAdapter

_LARGEST: dict[int, tuple[Any, tuple[int, int]]] = {}  # id(processor) → (processor, (width, height))


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_class, processor_class = "LlavaNextForConditionalGeneration", "LlavaNextProcessor"
    fixed_image_tokens = False

    def __init__(self, model, processor, name: str):
        super().__init__(model, processor, name)
        if self.kept_cls:
            raise NoticeError(f"model {name!r}: anyres packs {self.grid}x{self.grid} tokens per tile, so the projector "
                              "must not read a [CLS]; use vision_feature_select_strategy 'default' with a CLIP tower")
        self.tile_positions = self.vision_positions()  # per tile: [CLS] (where the tower has one) + patches
        largest = self.nominal_image(processor).size
        self.streams["vision"] = dataclasses.replace(
            self.streams["vision"], description=f"{self.tower_name} over each tile ({self.first_patch and '[CLS] + '}"
            f"{self.grid}x{self.grid} patches), base tile first; layers 0..{self.vision_layers_used - 1} feed the "
            "projector")
        self.streams["projector"] = dataclasses.replace(
            self.streams["projector"], description=f"multimodal projector output, {self.grid ** 2} per tile: the image "
            f"tokens are the base tile's {self.grid ** 2}, then the other tiles' without padding and with a newline "
            f"after each row, {self.image_token_count()} for a {largest[0]}x{largest[1]} image")

    tower_name = "CLIP vision tower"


    @classmethod
    def nominal_image(cls, processor) -> Image.Image:
        """An image of the pinpoint whose tiles give the most image tokens: no prompt is longer."""
        if id(processor) not in _LARGEST:
            prompt = chat_image_prompt(processor)

            def tokens(size: tuple[int, int]) -> int:
                ids = processor(images=[[Image.new("RGB", size)]], text=[prompt], return_tensors="pt")["input_ids"]
                return int((ids == processor.image_token_id).sum())
            sizes = [(int(w), int(h)) for h, w in processor.image_processor.image_grid_pinpoints]
            _LARGEST[id(processor)] = (processor, max(sizes, key=tokens))
        return Image.new("RGB", _LARGEST[id(processor)][1])

    # ----------------------------------------------------------- image geometry
    def image_key(self, image: Image.Image) -> Any:
        return image.size  # the processor's tiles and the image tokens follow from the size alone

    def image_geometry(self, inputs) -> tuple[int, int]:
        """The (height, width) of the batch's images, which tiles and unpadding follow."""
        sizes = {tuple(size) for size in inputs.image_sizes.tolist()}
        if len(sizes) != 1:
            raise ValueError("images of one batch must have one size; use batches_by_length with the images")
        return next(iter(sizes))

    def tiles(self, geometry: tuple[int, int]) -> int:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        return image_size_to_num_patches(list(geometry), config.image_grid_pinpoints, config.vision_config.image_size)

    def vision_context(self, cache: dict, layer: int, count: int) -> tuple[None, torch.Tensor]:
        """Each position sees its own tile's (the tower reads the tiles as a batch)."""
        tile = torch.arange(count, device=self.device) // self.tile_positions
        return None, tile[:, None] == tile[None, :]

    def vision_span(self, positions: int) -> int:
        return min(positions, self.tile_positions)

    def stream_rows(self, stream: str, run: Run) -> int:
        return self.tiles(self.image_geometry(run.inputs)) if stream in ("vision", "projector") else 1

    def image_token_count(self) -> int:
        """Image tokens of the largest expansion (see `nominal_image`)."""
        return int((torch.tensor(self._prompt_ids("?")) == self.image_token_id).sum())

    def num_positions(self, run: Run) -> dict[str, int]:
        tiles = self.tiles(self.image_geometry(run.inputs))
        return {"vision": tiles * self.tile_positions, "projector": tiles * self.grid ** 2,
                "lm": int(run.inputs.input_ids.shape[1])}

    def position_labels(self, run: Run) -> dict[str, list[str]]:
        geometry = self.image_geometry(run.inputs)
        tiles, patches = self.tiles(geometry), grid_labels(self.grid, self.grid)
        names = ["base"] + [f"tile {t}" for t in range(1, tiles)]
        vision = [f"{name} {label}" for name in names for label in ["[CLS]"] * self.first_patch + patches]
        projector = [f"{name} {label}" for name in names for label in patches]
        ids = run.inputs.input_ids[0]
        tokens = self.tokenizer.convert_ids_to_tokens(ids.tolist())
        for label, position in zip(self.image_token_labels(geometry), self.image_positions(ids).tolist()):
            tokens[position] = f"<image {label}>"
        return {"vision": vision, "projector": projector, "lm": tokens}

    def image_token_labels(self, geometry: tuple[int, int]) -> list[str]:
        """What each image token is: a base-tile patch, a cell of the tiles' canvas, or a row's newline
        (read off the model's own packing of zeros with a newline of ones)."""
        probe = torch.zeros(1, self.tiles(geometry) * self.grid ** 2, 1)
        newline = self.pack_features(probe, geometry, torch.ones(1))[0, :, 0] == 1
        base = self.grid ** 2
        rows = int(newline.sum())
        width = (len(newline) - base) // max(rows, 1) - 1
        labels = [f"base {label}" for label in grid_labels(self.grid, self.grid)]
        for i in range(len(newline) - base):
            row, col = divmod(i, width + 1)
            labels.append(f"newline {row}" if col == width else f"tiles {row},{col}")
        return labels

    # ------------------------------------------------------------------- tower
    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Each tile's patch + position embeddings, an image's tiles in a row: [B, tiles * Pt, Dv]."""
        batch = pixel_values.shape[0]
        return self.tower.embeddings(pixel_values.flatten(0, 1)).reshape(batch, -1, self.tower_width)

    @property
    def tower_width(self) -> int:
        return int(self.model.config.vision_config.hidden_size)

    def by_tile(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, tiles * Pt, W] → [N * tiles, Pt, W]: the tiles as the tower's batch."""
        return rows.reshape(-1, self.tile_positions, rows.shape[-1])

    def encode_image(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """The projector's rows [B, tiles * P, D]; the packing into image tokens follows in pack_features."""
        batch = image_embeddings.shape[0]
        hidden = self.tower_input(self.by_tile(image_embeddings))
        for layer in self.tower.encoder.layers[:self.vision_layers_used]:
            hidden = layer(hidden, None)
        return self.project(hidden).reshape(batch, -1, self.streams["lm"].hidden)

    def vision_rerun(self, hidden: torch.Tensor, layer: int, cache: dict) -> torch.Tensor:
        rows = hidden.shape[0]
        hidden = self.by_tile(hidden)
        for block in self.blocks["vision"][layer + 1:]:
            hidden = block.forward(hidden)
        return self.project(hidden).reshape(rows, -1, self.streams["lm"].hidden)

    def pack_features(self, projected: torch.Tensor, geometry: Any, newline: torch.Tensor | None = None) -> torch.Tensor:
        """The model's own packing of each row's tiles [N, tiles * P, D] into image tokens [N, I, D]."""
        tiles = [row.reshape(-1, self.grid ** 2, row.shape[-1]) for row in projected]
        sizes = torch.tensor([list(geometry)] * len(tiles), device=projected.device)
        newline = self.model.model.image_newline if newline is None else newline
        return torch.stack(self.pack(tiles, sizes, newline))

    def pack(self, tiles: list[torch.Tensor], sizes: torch.Tensor, newline: torch.Tensor) -> list[torch.Tensor]:
        features, _ = self.model.model.pack_image_features(tiles, sizes, vision_feature_select_strategy="default",
                                                           image_newline=newline)
        return features

    def first_image_position(self, cache: dict, positions: torch.Tensor) -> int:
        """Base-tile tokens come first, one per projector row; any other tile reaches the canvas from its start."""
        return int(cache["image_positions"][min(int(positions.min()), self.grid ** 2)])

    def grid_positions(self, image_positions: torch.Tensor) -> torch.Tensor:
        return image_positions[:self.grid ** 2]  # the base tile: the whole image on the tower's grid

    # -------------------------------------------------------------------- pairs
    def runs_for(self, clean_image, corrupt_image, clean_prompt: str, corrupt_prompt: str,
                 noise: dict[str, Any] | None = None) -> tuple[Run, Run]:
        if clean_image.size != corrupt_image.size:
            raise NoticeError(f"the clean image is {clean_image.size[0]}x{clean_image.size[1]} and the corrupt one "
                              f"{corrupt_image.size[0]}x{corrupt_image.size[1]}: {self.family} tiles each by its size, "
                              "so a pair's images must have the same size; resize the corrupt image to the clean one's")
        return super().runs_for(clean_image, corrupt_image, clean_prompt, corrupt_prompt, noise)

    def embedding_sigma(self, stream: str, embeddings: torch.Tensor) -> float:
        if stream == "vision":  # every tile's patches, [CLS] excluded
            return float(self.by_tile(embeddings)[:, self.first_patch:].detach().float().std())
        return super().embedding_sigma(stream, embeddings)

    def resolve_noise(self, spec: dict[str, Any], prompt: str, run: Run, mask: np.ndarray | None = None) -> dict[str, Any]:
        """Image noise on every tile: "all" its patches, or "object" the patches the clean object's mask
        touches in each tile, the mask cut into tiles by the image processor itself."""
        if spec["stream"] != "vision":
            return super().resolve_noise(spec, prompt, run, mask)
        geometry = self.image_geometry(run.inputs)
        tiles, patches = self.tiles(geometry), self.grid ** 2
        if spec["positions"] == "all":
            return dict(spec, positions=[t * self.tile_positions + self.first_patch + p
                                         for t in range(tiles) for p in range(patches)])
        if spec["positions"] != "object":
            return dict(spec, positions=list(spec["positions"]))
        if mask is None:
            raise NoticeError("image noise on the 'object' needs the pair's clean_mask")
        positions = []
        for t, tile in enumerate(self.mask_tiles(mask, geometry)):
            positions += mask_patch_positions(tile, (self.grid, self.grid), t * self.tile_positions + self.first_patch)
        return dict(spec, positions=positions)

    def mask_tiles(self, mask: np.ndarray, geometry: tuple[int, int]) -> list[np.ndarray]:
        """The object mask [H, W] cut as the image is: the base tile, then the tiles of its best grid."""
        from transformers.image_utils import PILImageResampling

        height, width = geometry
        picture = Image.fromarray(((mask > 0) * 255).astype(np.uint8)).convert("RGB").resize((width, height),
                                                                                          Image.Resampling.NEAREST)
        processor = self.processor.image_processor
        size = self.model.config.vision_config.image_size
        tiles = processor.get_image_patches(np.asarray(picture).transpose(2, 0, 1), processor.image_grid_pinpoints,
                                            size=(size, size), patch_size=size, resample=PILImageResampling.NEAREST)
        return [np.asarray(tile)[0] for tile in tiles]


def chat_image_prompt(processor) -> str:
    from notice.models.image_tokens import chat_prompt

    return chat_prompt(processor, "?")
