"""LLaVA (transformers' `LlavaForConditionalGeneration`, e.g. llava-hf/llava-1.5-7b-hf).

    pixel_values ──CLIP vision tower──▶ hidden states of layer `vision_feature_layer` [B, 1+P, Dv]
      ──drop [CLS] ("default" strategy)──▶ projector (MLP) ──▶ image features [B, I, D]
    <image> expanded to I tokens in the chat-template prompt ──Llama──▶ logits at the last position

Everything on the language-model side is shared with the other image-token families
(models/image_tokens.py); this file holds LLaVA's paths, its tower and its loading.
"""

from __future__ import annotations

from pathlib import Path

import torch

from notice.errors import NoticeError
from notice.models.base import Run, StreamFacts, StreamMap, resolve_dtype
from notice.models.blocks import DecoderBlock, EncoderBlock
from notice.models.image_tokens import ImageTokenAdapter

STREAM_MAPS = {
    "vision": StreamMap("model.vision_tower.encoder.layers", writes={"self_attn": "self_attn.out_proj", "mlp": "mlp"},
                        heads={"self_attn": "self_attn.out_proj"}),
    "projector": StreamMap("model.multi_modal_projector", single=True),
    "lm": StreamMap("model.language_model.layers", writes={"self_attn": "self_attn.o_proj", "mlp": "mlp"},
                    heads={"self_attn": "self_attn.o_proj"}),
}


def clip_block(layer) -> EncoderBlock:
    attn = layer.self_attn
    return EncoderBlock(out=attn.out_proj, mlp_norm=layer.layer_norm2, mlp=layer.mlp, attn_norm=layer.layer_norm1,
                        qkv=lambda x: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)), heads=attn.num_heads,
                        scale=attn.scale)


def llama_block(layer, heads: int, kv_heads: int) -> DecoderBlock:
    attn = layer.self_attn
    return DecoderBlock(out=attn.o_proj, mlp_norm=layer.post_attention_layernorm, mlp=layer.mlp,
                        attn_norm=layer.input_layernorm, q_proj=attn.q_proj, k_proj=attn.k_proj, v_proj=attn.v_proj,
                        heads=heads, kv_heads=kv_heads, head_dim=attn.head_dim, scale=attn.scaling)


class LlavaAdapter(ImageTokenAdapter):
    family = "llava"
    model_class, processor_class = "LlavaForConditionalGeneration", "LlavaProcessor"
    lm_path = "model.language_model"

    def __init__(self, model, processor, name: str):
        super().__init__(model, processor, name)
        config = model.config
        vision, text = config.vision_config, config.text_config
        lm_layer = self.lm.layers[0]
        for part in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp"):
            if not hasattr(lm_layer, part):
                raise NoticeError(f"model {name!r}: its language model layers have no {part}; notice supports "
                                  "Llama-style decoders (llava-1.5, Vicuna, Mistral)")
        self.image_token_id = int(config.image_token_id)
        feature_layer = config.vision_feature_layer
        if not isinstance(feature_layer, int):
            feature_layer = max(feature_layer, key=lambda i: i % (vision.num_hidden_layers + 1))
        # hidden_states[k] is the output of layer k-1 (0 is the embeddings): later layers never reach the LM
        self.vision_layers_used = feature_layer % (vision.num_hidden_layers + 1)
        self.drop_cls = config.vision_feature_select_strategy == "default"
        self.kept_cls = 0 if self.drop_cls else self.first_patch  # a [CLS] the projector reads (one per image)
        self.grid = vision.image_size // vision.patch_size
        kv_heads = int(text.num_key_value_heads or text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        self.streams = {
            "vision": StreamFacts.of("vision", vision, ("layer", "self_attn", "mlp"), "patch",
                                     f"CLIP vision tower over {self.grid ** 2 + 1} tokens ([CLS] + {self.grid}x{self.grid} "
                                     f"patches); layers 0..{self.vision_layers_used - 1} feed the projector",
                                     layers=self.vision_layers_used),
            "projector": StreamFacts("projector", 1, 0, 0, text.hidden_size, ("layer",), "image token",
                                     f"multimodal projector output: {self.image_token_count()} image tokens"),
            "lm": StreamFacts("lm", text.num_hidden_layers, text.num_attention_heads, head_dim, text.hidden_size,
                              ("layer", "self_attn", "mlp"), "token",
                              f"causal language model over the prompt, image tokens included; grouped-query "
                              f"attention: {text.num_attention_heads} query heads share {kv_heads} key/value heads",
                              reads_answer=True),
        }
        self.stream_maps = STREAM_MAPS
        self.blocks = {"vision": [clip_block(l) for l in self.tower.encoder.layers[:self.vision_layers_used]],
                       "lm": [llama_block(l, text.num_attention_heads, kv_heads) for l in self.lm.layers]}

    @property
    def tower(self):
        return self.model.model.vision_tower

    @classmethod
    def from_pretrained(cls, source: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32",
                        name: str | None = None, load_in_4bit: bool = False, **options) -> "LlavaAdapter":
        """As every family loads, or with 4-bit weights (bitsandbytes, a CUDA device) placed by a device map."""
        import transformers

        if not load_in_4bit or options:
            return super().from_pretrained(source, device, dtype, name, **options)  # type: ignore[return-value]
        torch_dtype = resolve_dtype(dtype)
        model = getattr(transformers, cls.model_class).from_pretrained(
            str(source), dtype=torch_dtype, quantization_config=four_bit_config(torch_dtype), device_map={"": device})
        return cls(model, cls.load_processor(source), name or str(source))

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        return self.grid, self.grid, self.model.config.vision_config.patch_size

    def image_token_count(self) -> int:
        return self.grid * self.grid + self.kept_cls

    def feature_labels(self, run: Run) -> list[str]:
        return ["[CLS]"] * self.kept_cls + super().feature_labels(run)

    def grid_positions(self, image_positions: torch.Tensor) -> torch.Tensor:
        return image_positions[self.kept_cls:]

    # ------------------------------------------------------------------- tower
    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings before the tower's pre-LayerNorm, [B, 1+P, Dv]."""
        return self.tower.embeddings(pixel_values)

    def encode_image(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Through the tower's own layers up to the feature layer, then the projector: [B, I, D]."""
        hidden = self.tower_input(image_embeddings)
        for layer in self.tower.encoder.layers[:self.vision_layers_used]:
            hidden = layer(hidden, None)
        return self.project(hidden)

    def tower_input(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """What the tower's first layer reads: CLIP normalizes its embeddings first."""
        return self.tower.pre_layrnorm(image_embeddings)

    def project(self, vision_states: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(vision_states[:, 1:] if self.drop_cls else vision_states)

    def vision_rerun(self, hidden: torch.Tensor, layer: int, cache: dict) -> torch.Tensor:
        for block in self.blocks["vision"][layer + 1:]:
            hidden = block.forward(hidden)
        return self.project(hidden)


def four_bit_config(compute_dtype: torch.dtype):
    """bitsandbytes 4-bit (NF4) loading, an optional extra: `pip install notice[4bit]`."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise NoticeError("4-bit loading needs bitsandbytes, which is not installed: pip install 'notice[4bit]' "
                          "(CUDA only) or load in bfloat16") from error
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
