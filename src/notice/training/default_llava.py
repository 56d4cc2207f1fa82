"""The recipe of the embedded tiny LLaVA: a LLaVA-architecture model trained on easy-VQA.

transformers' `LlavaForConditionalGeneration` at toy size: a CLIP vision tower (64 px images,
16 px patches, so 16 image tokens), the two-layer projector and a Llama decoder with grouped-query
attention; a BPE tokenizer built from the questions; llava-1.5's chat template. Two seeded stages:
  1. the vision tower learns colour and shape as image classification with per-patch targets,
     exactly the BLIP default's stage 1 (`default_blip.train_stage1`);
  2. the whole model learns to answer easy-VQA, two-way choice questions and yes/no questions naming
     each image's own colour as the next token after the prompt (then </s>), each image's vision
     pass shared by its questions, with the BLIP default's presence probe halfway up the language model.
Images are translated by up to 6 px in both stages: 16 px patches otherwise meet small shapes at
few alignments, and shape was this model's weak kind.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from notice.tasks import easy_vqa
from notice.training.default_blip import TrainingData, presence_loss, run_stage2, train_stage1, training_questions

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# llava-1.5's prompt format with a space for its newline (one vocabulary entry fewer per word)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image> {% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@dataclass
class LlavaRecipe:
    seed: int = 0
    image_size: int = 64
    patch_size: int = 16
    hidden: int = 128  # vision width (the name stage 1 reads)
    vision_layers: int = 4
    heads: int = 4  # vision heads
    mlp: int = 512
    lm_hidden: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    lm_kv_heads: int = 2
    lm_mlp: int = 384
    vocab_size: int = 400
    choice_per_kind: int = 2
    shown_color_per_image: int = 2
    presence_weight: float = 0.5
    max_shift: int = 6  # 16 px patches meet small shapes at few alignments: translate by up to 6 px
    stage1_epochs: int = 20
    stage1_batch: int = 32
    stage1_lr: float = 2e-3
    stage2_epochs: int = 10
    images_per_step: int = 32
    questions_per_image: int = 6
    stage2_lr: float = 1e-3
    weight_decay: float = 0.01
    threads: int = 2


def build_tokenizer(texts: list[str], vocab_size: int):
    """A Llama-style BPE tokenizer (metaspace, <s> prepended) whose merges make every easy-VQA word one
    token; single letters keep any other word spellable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789?:.,'-!")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet)
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   model_max_length=64)


def build_processor(recipe: LlavaRecipe, texts: list[str]):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": recipe.image_size},
                                            crop_size={"height": recipe.image_size, "width": recipe.image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(texts, recipe.vocab_size),
                          patch_size=recipe.patch_size, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def build_model(recipe: LlavaRecipe, tokenizer):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = dict(model_type="clip_vision_model", image_size=recipe.image_size, patch_size=recipe.patch_size,
                  hidden_size=recipe.hidden, intermediate_size=recipe.mlp, num_hidden_layers=recipe.vision_layers,
                  num_attention_heads=recipe.heads, projection_dim=recipe.hidden)
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=recipe.lm_hidden,
                intermediate_size=recipe.lm_mlp, num_hidden_layers=recipe.lm_layers,
                num_attention_heads=recipe.lm_heads, num_key_value_heads=recipe.lm_kv_heads,
                max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    grid = recipe.image_size // recipe.patch_size
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,  # type: ignore[call-arg]
                         image_seq_length=grid * grid, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(recipe.seed)
    return LlavaForConditionalGeneration(config)


def prompt_ids(processor, question: str) -> list[int]:
    """The full prompt's ids, <image> expanded to one token per image feature."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    image = processor.image_token * (processor.image_processor.crop_size["height"] // processor.patch_size) ** 2
    return processor.tokenizer(text.replace(processor.image_token, image))["input_ids"]


def image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] → projected image features [B, I, D] as LlavaForConditionalGeneration computes them."""
    states = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    return model.model.multi_modal_projector(states[model.config.vision_feature_layer][:, 1:])


def answer_step_logits(model, ids: list[list[int]], features: torch.Tensor, extra: int = 0) -> torch.Tensor:
    """Logits [N, 1 + extra, V] at each prompt's last position (and `extra` positions after it)."""
    return model.lm_head(_answer_states(model, ids, features, extra)[-1])


def pad_right(ids: list[list[int]], pad: int) -> torch.Tensor:
    """Prompts [N, T], right-padded: a causal model never looks right, so padding changes nothing that is read."""
    length = max(len(row) for row in ids)
    return torch.tensor([row + [pad] * (length - len(row)) for row in ids])


def pick_last(states: tuple[torch.Tensor, ...], ids: list[list[int]], extra: int) -> tuple[torch.Tensor, ...]:
    """Each layer's states [N, 1 + extra, D] at each row's last `1 + extra` real positions."""
    last = torch.tensor([len(row) - 1 - extra for row in ids])
    picked = torch.arange(len(ids))[:, None], last[:, None] + torch.arange(1 + extra)[None]
    return tuple(layer[picked] for layer in states)


def _answer_states(model, ids: list[list[int]], features: torch.Tensor, extra: int = 0) -> tuple[torch.Tensor, ...]:
    """Every layer's states [N, 1 + extra, D] (the embeddings first) at each prompt's last position and the
    `extra` positions after it."""
    input_ids = pad_right(ids, model.config.text_config.pad_token_id)
    embeds = model.model.language_model.embed_tokens(input_ids)
    mask = (input_ids == model.config.image_token_id)[..., None]
    embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
    states = model.model.language_model(inputs_embeds=embeds, use_cache=False, output_hidden_states=True).hidden_states
    return pick_last(states, ids, extra)  # the last one is the final norm's output, as lm_head reads


def next_token_answer_loss(lm_head, tokenizer, prompt_ids, answer_states, probe: torch.nn.Module | None,
                           presence_weight: float, probe_layer: int):
    """A decoder's stage-2 loss: the next-token logits after each prompt (the answer), then end of text; the
    presence probe reads the answer position at `probe_layer`, leaving the layers above it to turn presence
    into the answer. `answer_states(image_pixels, owner, rows)` runs the family's model on the teacher-forced
    rows and returns every layer's states [N, 2, D] at the prompt's last position and the answer's."""
    ids_of: dict[str, list[int]] = {}
    answer_of: dict[str, int] = {}
    eos = tokenizer.eos_token_id

    def answer_loss(image_pixels: torch.Tensor, owner: torch.Tensor, questions: list[easy_vqa.Question]):
        rows, answers = [], []
        for q in questions:
            if q.question not in ids_of:
                ids_of[q.question] = prompt_ids(q.question)
            if q.answer not in answer_of:
                answer_of[q.answer] = tokenizer(q.answer, add_special_tokens=False)["input_ids"][0]
            rows.append(ids_of[q.question] + [answer_of[q.answer]])  # teacher-forced answer, then end of text
            answers.append(answer_of[q.answer])
        states = answer_states(image_pixels, owner, rows)  # each [N, 2, D]
        logits = lm_head(states[-1])  # [N, 2, V]
        target = torch.tensor(answers)
        loss = F.cross_entropy(logits[:, 0], target) + 0.5 * F.cross_entropy(logits[:, 1], torch.full_like(target, eos))
        if probe is not None:
            loss = loss + presence_weight * presence_loss(probe, states[probe_layer][:, 0], questions)
        return loss, int((logits[:, 0].argmax(1) == target).sum())

    return answer_loss


def llava_answer_loss(model, processor, probe: torch.nn.Module | None = None, presence_weight: float = 0.0):
    """LLaVA's stage-2 forward: the image features scattered into the <image> tokens, the presence probe
    halfway up the language model."""
    def answer_states(image_pixels: torch.Tensor, owner: torch.Tensor, rows: list[list[int]]):
        return _answer_states(model, rows, image_features(model, image_pixels)[owner], extra=1)

    return next_token_answer_loss(model.lm_head, processor.tokenizer, lambda q: prompt_ids(processor, q), answer_states,
                                  probe, presence_weight, model.config.text_config.num_hidden_layers // 2)


def train_default_llava(out_dir: Path, recipe: LlavaRecipe | None = None, log=print) -> dict:
    """Train the embedded tiny LLaVA from easy-VQA and save it (with its processor) to `out_dir`."""
    recipe = recipe or LlavaRecipe()

    def processor_for(questions: list[easy_vqa.Question]):
        return build_processor(recipe, sorted({f"USER: {q.question} ASSISTANT: {q.answer}" for q in questions}))

    # stage 1 reads the vision encoder as `model.vision_model` and its last hidden state: the tower is that
    return train_decoder(out_dir, recipe, processor_for, build_model, lambda model: model.model.vision_tower,
                         llava_answer_loss, recipe.lm_hidden, log)


def train_decoder(out_dir: Path, recipe, processor_for, build_model, vision_model, answer_loss, probe_width: int,
                  log=print) -> dict:
    """The image-text decoders' recipe (LLaVA, Llama-3.2-Vision), seeded: the processor made from every
    question (`processor_for`), stage 1 on `vision_model(model)`, stage 2 with `answer_loss(model, processor,
    probe, weight)` and a presence probe reading `probe_width` states; model and processor saved to `out_dir`."""
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    started = time.time()
    out_dir = Path(out_dir)

    train_questions = training_questions(recipe)
    processor = processor_for(train_questions + list(easy_vqa.load_questions("test")))
    model = build_model(recipe, processor.tokenizer)
    model.train()

    data = TrainingData.load(processor.image_processor, train_questions)
    log(f"easy-VQA train: {data.summary()}, vocabulary {len(processor.tokenizer)}")
    train_stage1(SimpleNamespace(vision_model=vision_model(model)), recipe, data, log)
    probe = torch.nn.Linear(probe_width, 2)
    run_stage2(model, recipe, data.pixels, data.image_index, data.questions_by_image,
               answer_loss(model, processor, probe, recipe.presence_weight), log, probe=probe)
    model.eval()
    minutes = (time.time() - started) / 60
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    log(f"trained in {minutes:.1f} min; saved to {out_dir}")
    return {"recipe": asdict(recipe), "train_minutes": round(minutes, 1), "vocab_size": len(processor.tokenizer)}
