"""The fast-path math, once per block kind. A family composes these runners and supplies its facts
(modules, head counts, rotary tables, masks); nothing here knows a module path.

    EncoderBlock   pre-LayerNorm encoder layer (ViT, CLIP, SigLIP): every position sees every other
    DecoderBlock   pre-norm decoder layer (Llama, Qwen2, Gemma): RoPE, grouped-query attention,
                   reruns from a position on over the receiving run's cached key/value prefix
    BertBlock      post-LayerNorm BERT layer with optional cross-attention (BLIP, the Q-Former)

Each block runs a whole layer on rows (`forward`), finishes a layer position-wise from a patched
target (`finish`: nothing after the attention mixes positions) and derives, in a trace, the
intermediates `finish` reads (`derive`).
"""

from notice.models.blocks.bert import BertBlock, CrossAttention
from notice.models.blocks.prenorm import DecoderBlock, EncoderBlock

__all__ = ["BertBlock", "CrossAttention", "DecoderBlock", "EncoderBlock"]
