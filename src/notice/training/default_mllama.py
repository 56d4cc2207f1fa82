"""The recipe of the embedded tiny Llama-3.2-Vision: an mllama-architecture model trained on easy-VQA.

transformers' `MllamaForConditionalGeneration` at toy size: a tiling vision tower with one tile (64 px
images, 8 px patches, so [CLS] + 64 patch states per image), a local encoder whose intermediate outputs
are kept beside a gated global encoder's, the projector, and a Llama decoder with grouped-query attention
in which the image enters ONLY through gated cross-attention layers (the prompt holds one <|image|> token,
never expanded); a byte-level BPE tokenizer (Llama 3's kind) built from the questions; the base models'
prompt `<|image|><|begin_of_text|>question`, the shortest. Two seeded stages, as the embedded LLaVA's:
  1. the tower, through the projector (what the text reads), learns colour and shape as image
     classification with per-patch targets (`default_blip.train_stage1`);
  2. the whole model learns to answer easy-VQA, two-way choice questions and yes/no questions naming each
     image's own colour as the next token after the prompt (then <|end_of_text|>), each image's vision pass
     shared by its questions, with the presence probe halfway up the language model.
The cross-attention layers' tanh gates start at zero in transformers (the text never sees the image, and
nothing upstream of a gate gets a gradient): the recipe sets them to `gate_init` and lets them train.
transformers' weight init also draws the global encoder's gates near zero (its layer's constructor sets
pi/4); trained from there they stayed shut (tanh 0.06 and 0.00 after the first recipe, which set only the
cross-attention gates), so the recipe starts them at pi/4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from notice.models.mllama import MllamaAdapter
from notice.tasks import easy_vqa
from notice.training.default_llava import next_token_answer_loss, pad_right, pick_last, train_decoder

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"]
IMAGE_TOKEN = "<|image|>"  # added after training: the last id, one past the LM head as in the real checkpoints


@dataclass
class MllamaRecipe:
    seed: int = 0
    image_size: int = 64
    patch_size: int = 8
    hidden: int = 128  # vision width, and the projected width stage 1 reads (the LM's)
    vision_layers: int = 4  # local encoder
    global_layers: int = 1  # gated global encoder
    kept_layers: tuple[int, ...] = (1, 3)  # local outputs that reach the projector beside the global one
    heads: int = 4  # vision heads
    mlp: int = 512
    lm_layers: int = 5
    cross_layers: tuple[int, ...] = (1, 3)  # the only way the image reaches the text
    lm_heads: int = 4
    lm_kv_heads: int = 2
    lm_mlp: int = 384
    gate_init: float = 0.5  # the cross-attention layers' tanh gates (transformers starts them at 0)
    global_gate_init: float = math.pi / 4  # the global encoder's gates, as its layer's constructor sets them
    vocab_size: int = 600
    choice_per_kind: int = 2
    shown_color_per_image: int = 2
    presence_weight: float = 0.5
    max_shift: int = 0
    stage1_epochs: int = 12
    stage1_batch: int = 32
    stage1_lr: float = 2e-3
    stage2_epochs: int = 8
    images_per_step: int = 32
    questions_per_image: int = 6
    stage2_lr: float = 1e-3
    weight_decay: float = 0.01
    threads: int = 1


def build_tokenizer(texts: list[str], vocab_size: int):
    """Llama 3's kind of tokenizer: byte-level BPE, <|begin_of_text|> prepended, <|image|> the last id; merges
    learnt from the prompts and the bare answers make every easy-VQA word and answer one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = SPECIAL_TOKENS[0]
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 0)])])
    backend.add_special_tokens([IMAGE_TOKEN])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token="<|end_of_text|>",
                                   pad_token="<|finetune_right_pad_id|>", model_max_length=64)


def build_processor(recipe: MllamaRecipe, questions: list[str], answers: list[str]):
    """The processor without a chat template: the adapter then prompts as the base models read."""
    from transformers import MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tokenizer = build_tokenizer(questions + answers, recipe.vocab_size)
    split = [a for a in answers if len(tokenizer(a, add_special_tokens=False)["input_ids"]) != 1]
    if split:
        raise ValueError(f"answers {split} are not one token: raise vocab_size ({recipe.vocab_size})")
    image_processor = MllamaImageProcessorPil(size={"height": recipe.image_size, "width": recipe.image_size},
                                              max_image_tiles=1)
    return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_model(recipe: MllamaRecipe, tokenizer):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_token == len(tokenizer) - 1, "the image token is the last id, beyond the LM head"
    vision = dict(image_size=recipe.image_size, patch_size=recipe.patch_size, max_num_tiles=1,
                  hidden_size=recipe.hidden, num_hidden_layers=recipe.vision_layers,
                  num_global_layers=recipe.global_layers, attention_heads=recipe.heads,
                  intermediate_size=recipe.mlp, intermediate_layers_indices=list(recipe.kept_layers),
                  vision_output_dim=recipe.hidden * (1 + len(recipe.kept_layers)), supported_aspect_ratios=[[1, 1]])
    text = dict(vocab_size=image_token, hidden_size=recipe.hidden, num_hidden_layers=recipe.lm_layers,
                cross_attention_layers=list(recipe.cross_layers), num_attention_heads=recipe.lm_heads,
                num_key_value_heads=recipe.lm_kv_heads, intermediate_size=recipe.lm_mlp,
                max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(recipe.seed)
    model = MllamaForConditionalGeneration(MllamaConfig(vision_config=vision, text_config=text,
                                                        image_token_index=image_token))
    with torch.no_grad():
        for l in recipe.cross_layers:
            layer = model.model.language_model.layers[l]
            layer.cross_attn_attn_gate.fill_(recipe.gate_init)
            layer.cross_attn_mlp_gate.fill_(recipe.gate_init)
        for layer in model.model.vision_model.global_transformer.layers:
            layer.gate_attn.fill_(recipe.global_gate_init)
            layer.gate_ffn.fill_(recipe.global_gate_init)
    return model


class ImageStates(torch.nn.Module):
    """The tower and projector as stage 1 reads a vision encoder: pixels [B, 3, H, W] (one tile each) →
    `last_hidden_state` [B, 1 + P, D], the states the text's cross-attention reads ([CLS] first)."""

    def __init__(self, model):
        super().__init__()
        self.vision_model = model.model.vision_model
        self.projector = model.model.multi_modal_projector

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        batch = len(pixel_values)
        ones = torch.ones(batch, 1, dtype=torch.long)
        tiles = self.vision_model(pixel_values=pixel_values[:, None, None], aspect_ratio_ids=ones,
                                  aspect_ratio_mask=ones[..., None]).last_hidden_state  # [B, 1, 1, 1 + P, Dv·k]
        return SimpleNamespace(last_hidden_state=self.projector(tiles).reshape(batch, -1, self.projector.out_features))


def mllama_answer_loss(model, processor, probe: torch.nn.Module | None = None, presence_weight: float = 0.0):
    """mllama's stage-2 forward: each image's states once, read by its questions' cross-attention layers
    (every row sees the image: the image token comes first); the presence probe halfway up the LM."""
    towers = ImageStates(model)
    pad = model.config.text_config.pad_token_id

    def answer_states(image_pixels: torch.Tensor, owner: torch.Tensor, rows: list[list[int]]):
        input_ids = pad_right(rows, pad)
        states = towers(image_pixels).last_hidden_state[owner]
        sees_image = torch.ones(*input_ids.shape, 1, 1, dtype=torch.long)  # [N, T, images, tiles]
        hidden = model.model(input_ids=input_ids, cross_attention_states=states, cross_attention_mask=sees_image,
                             use_cache=False, output_hidden_states=True).hidden_states
        return pick_last(hidden, rows, extra=1)

    return next_token_answer_loss(model.lm_head, processor.tokenizer,
                                  lambda q: MllamaAdapter.prompt_ids(processor, q), answer_states, probe,
                                  presence_weight, model.config.text_config.num_hidden_layers // 2)


def train_default_mllama(out_dir: Path, recipe: MllamaRecipe | None = None, log=print) -> dict:
    """Train the embedded tiny Llama-3.2-Vision from easy-VQA and save it (with its processor) to `out_dir`."""
    recipe = recipe or MllamaRecipe()

    def processor_for(questions: list[easy_vqa.Question]):
        return build_processor(recipe, sorted({q.question for q in questions}), sorted({q.answer for q in questions}))

    return train_decoder(out_dir, recipe, processor_for, build_model, ImageStates, mllama_answer_loss, recipe.hidden, log)
