"""The recipe of the embedded default model: a small BLIP trained on easy-VQA.

Two stages, both seeded:
  1. the vision encoder learns colour and shape as image classification (linear probes
     on the mean patch state and on every patch, thrown away afterwards): shapes are the
     slow part of easy-VQA for a ViT trained from scratch, per-patch targets (background,
     or the colour and the shape covering the patch) teach them several times faster, and
     this stage is cheap;
  2. the whole model learns to answer easy-VQA's questions plus two-way choice questions
     ("is the shape red or blue?") and yes/no questions naming each image's own colour, with
     each image's vision pass shared by its questions; a probe thrown away afterwards learns
     whether the colour or shape a yes/no question names is shown (`presence_loss`).
Images are augmented by horizontal flips, which keep colour and shape, and optionally by
translations (`max_shift`).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from notice.evaluation import evaluate_model
from notice.tasks import easy_vqa

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]


@dataclass
class Recipe:
    seed: int = 0
    image_size: int = 64
    patch_size: int = 8
    hidden: int = 128
    vision_layers: int = 4
    text_layers: int = 3  # text encoder and answer decoder (one BLIP setting)
    heads: int = 4
    mlp: int = 512
    choice_per_kind: int = 2  # two-way colour and shape questions per image
    shown_color_per_image: int = 2  # yes/no questions naming the image's own colour, per image
    presence_weight: float = 0.5  # stage 2's auxiliary target: is the colour or shape a yes/no question names shown?
    max_shift: int = 0  # random translation of the images, in pixels (both stages)
    stage1_epochs: int = 12
    stage1_batch: int = 32
    stage1_lr: float = 2e-3
    stage2_epochs: int = 6
    images_per_step: int = 32
    questions_per_image: int = 8
    stage2_lr: float = 1e-3
    weight_decay: float = 0.01
    threads: int = 2


def build_vocab(questions: list[easy_vqa.Question]) -> list[str]:
    """WordPiece vocabulary: special tokens, every word of the questions and answers,
    and single letters (plain and ##) so that any lower-case word still tokenizes."""
    words = set()
    for q in questions:
        for word in q.question.replace("?", " ? ").split() + [q.answer]:
            words.add(word)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = sorted(words - set(letters)) + letters + ["##" + c for c in letters] + list("?.,!'-") + list("0123456789")
    return SPECIAL_TOKENS + list(dict.fromkeys(pieces))


def build_processor(vocab: list[str], image_size: int, folder: Path):
    from transformers import BertTokenizer, BlipImageProcessorPil, BlipProcessor

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab_file), do_lower_case=True, bos_token="[DEC]",
                              additional_special_tokens=["[ENC]"], model_max_length=32)
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_model(recipe: Recipe, vocab_size: int, token_ids: dict[str, int]):
    from transformers import BlipConfig, BlipForQuestionAnswering

    vision = dict(image_size=recipe.image_size, patch_size=recipe.patch_size, hidden_size=recipe.hidden,
                  intermediate_size=recipe.mlp, num_hidden_layers=recipe.vision_layers,
                  num_attention_heads=recipe.heads, initializer_range=0.02)
    text = dict(vocab_size=vocab_size, hidden_size=recipe.hidden, intermediate_size=recipe.mlp,
                num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.heads,
                max_position_embeddings=32, encoder_hidden_size=recipe.hidden,
                pad_token_id=token_ids["[PAD]"], bos_token_id=token_ids["[DEC]"], sep_token_id=token_ids["[SEP]"])
    config = BlipConfig(vision_config=vision, text_config=text)
    torch.manual_seed(recipe.seed)
    return BlipForQuestionAnswering(config)


# ------------------------------------------------------------------------ data
def load_pixels(paths: list[Path], mean: tuple, std: tuple) -> torch.Tensor:
    """Images as the processor normalises them ([N, 3, H, W]); easy-VQA is already 64 px."""
    arrays = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]).astype(np.float32) / 255.0
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2)
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def augment(pixels: torch.Tensor, generator: torch.Generator, max_shift: int = 0) -> torch.Tensor:
    """A random horizontal flip per image: colour and shape are unchanged, and triangles
    still point up as in easy-VQA (quarter turns would show the model shapes it never meets);
    then, with `max_shift`, a random translation (see `shift`)."""
    flips = torch.rand(len(pixels), generator=generator) < 0.5
    pixels = torch.where(flips.view(-1, 1, 1, 1), pixels.flip(3), pixels)
    return shift(pixels, random_offsets(len(pixels), max_shift, generator)) if max_shift else pixels


def random_offsets(count: int, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(-max_shift, max_shift + 1, (count, 2), generator=generator)


def shift(images: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Translate each image [N, C, H, W] by its (dy, dx) pixels, filling with its edge values (easy-VQA's
    background). Large patches (LLaVA's 16 px) otherwise meet each shape at few alignments to their grid."""
    margin = int(offsets.abs().max())
    if margin == 0:
        return images
    height, width = images.shape[-2:]
    padded = F.pad(images, (margin,) * 4, mode="replicate")
    return torch.stack([padded[i, :, margin - dy:margin - dy + height, margin - dx:margin - dx + width]
                        for i, (dy, dx) in enumerate(offsets.tolist())])


def encode_questions(tokenizer, questions: list[str]) -> dict[str, torch.Tensor]:
    return tokenizer(questions, padding=True, return_tensors="pt", return_token_type_ids=False)


@dataclass
class TrainingData:
    """easy-VQA's training images (normalised as the processor does), their colour, shape and
    object coverage for stage 1, and the questions of each image for stage 2."""

    pixels: torch.Tensor  # [N, 3, H, W], every training image
    image_index: dict[int, int]  # image id → row of `pixels`
    labelled_pixels: torch.Tensor  # rows of images whose colour and shape are known
    colors: torch.Tensor  # [L] palette index
    shapes: torch.Tensor  # [L] shape index
    coverage: torch.Tensor  # [L, H, W] the object's share of each pixel
    questions_by_image: dict[int, list[easy_vqa.Question]]

    @classmethod
    def load(cls, image_processor, questions: list[easy_vqa.Question]) -> "TrainingData":
        paths = easy_vqa.image_paths("train")
        image_ids = sorted(paths)
        image_index = {image_id: i for i, image_id in enumerate(image_ids)}
        pixels = load_pixels([paths[i] for i in image_ids], image_processor.image_mean, image_processor.image_std)
        labels = easy_vqa.image_labels("train")
        labelled = [i for i in image_ids if i in labels]
        shapes = torch.tensor([easy_vqa.SHAPES.index(labels[i].shape) for i in labelled])
        by_image: dict[int, list[easy_vqa.Question]] = {}
        for q in questions:
            by_image.setdefault(q.image_id, []).append(q)
        return cls(pixels, image_index, pixels[[image_index[i] for i in labelled]],
                   torch.tensor([easy_vqa.COLORS.index(labels[i].color) for i in labelled]), shapes,
                   object_coverage([labels[i].path for i in labelled], [labels[i].color for i in labelled]),
                   by_image)

    def summary(self) -> str:
        questions = sum(len(q) for q in self.questions_by_image.values())
        return f"{len(self.pixels)} images ({len(self.colors)} labelled), {questions} questions"


# ------------------------------------------------------------------- training
def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def object_coverage(paths: list[Path], colors: list[str]) -> torch.Tensor:
    """[L, H, W]: how much of each pixel the object covers (anti-aliased edges are fractional)."""
    return torch.stack([torch.from_numpy(easy_vqa.object_alpha(np.asarray(Image.open(path).convert("RGB")), color))
                        .float() for path, color in zip(paths, colors)])


def patch_targets(coverage: torch.Tensor, values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per-patch targets [N, patches] for stage 1: 0 for background, 1 + value where the object covers at
    least a tenth of the patch. A dense signal teaches the patch features shape far sooner than one
    label per image."""
    covered = F.avg_pool2d(coverage[:, None], patch_size).flatten(1) >= 0.1
    return torch.where(covered, 1 + values[:, None], 0)


def train_stage1(model, recipe: Recipe, data: TrainingData, log) -> None:
    """Colour and shape per image (mean patch state) and per patch (background, or the colour and the
    shape covering it): the patch states then carry both attributes where the object is."""
    vision = model.vision_model
    pixels, colors, shapes = data.labelled_pixels, data.colors, data.shapes
    n_colors, n_shapes = len(easy_vqa.COLORS), len(easy_vqa.SHAPES)
    image_head = torch.nn.Linear(recipe.hidden, n_colors + n_shapes)
    patch_head = torch.nn.Linear(recipe.hidden, 1 + n_shapes + 1 + n_colors)
    params = list(vision.parameters()) + list(image_head.parameters()) + list(patch_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.stage1_lr, weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    steps_per_epoch = math.ceil(len(pixels) / recipe.stage1_batch)
    total = recipe.stage1_epochs * steps_per_epoch
    grid = recipe.image_size // recipe.patch_size
    step = 0
    for epoch in range(recipe.stage1_epochs):
        order = torch.randperm(len(pixels), generator=generator)
        correct_shape = 0
        for start in range(0, len(pixels), recipe.stage1_batch):
            idx = order[start:start + recipe.stage1_batch]
            for group in optimizer.param_groups:
                group["lr"] = recipe.stage1_lr * _cosine(step, total, warmup=steps_per_epoch // 2)
            flips = torch.rand(len(idx), generator=generator) < 0.5
            batch, coverage = pixels[idx], data.coverage[idx]
            if recipe.max_shift:  # the object's coverage moves with it
                offsets = random_offsets(len(idx), recipe.max_shift, generator)
                batch, coverage = shift(batch, offsets), shift(coverage[:, None], offsets)[:, 0]
            batch = torch.where(flips.view(-1, 1, 1, 1), batch.flip(3), batch)
            shape_targets, color_targets = (
                torch.where(flips.view(-1, 1, 1), t.view(-1, grid, grid).flip(2), t.view(-1, grid, grid)).flatten()
                for t in (patch_targets(coverage, values[idx], recipe.patch_size) for values in (shapes, colors)))
            states = vision(pixel_values=batch).last_hidden_state
            logits = image_head(states[:, 1:].mean(dim=1))
            patch_logits = patch_head(states[:, 1:]).flatten(0, 1)
            loss = (F.cross_entropy(logits[:, :n_colors], colors[idx]) + F.cross_entropy(logits[:, n_colors:], shapes[idx])
                    + F.cross_entropy(patch_logits[:, :1 + n_shapes], shape_targets)
                    + F.cross_entropy(patch_logits[:, 1 + n_shapes:], color_targets))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            correct_shape += int((logits[:, n_colors:].argmax(1) == shapes[idx]).sum())
            step += 1
        log(f"stage 1 epoch {epoch + 1}/{recipe.stage1_epochs}: loss {loss.item():.3f}, "
            f"train shape accuracy {correct_shape / len(pixels):.3f}")


def run_stage2(model, recipe, pixels: torch.Tensor, image_index: dict[int, int],
               questions_by_image: dict[int, list[easy_vqa.Question]], answer_loss, log, evaluate=None,
               probe: torch.nn.Module | None = None) -> None:
    """Stage 2 for either family: seeded batches of images, each with a sample of its questions,
    and a cosine schedule. `answer_loss(image_pixels, owner, questions) -> (loss, correct)` is the
    family's forward; `owner[k]` is the batch row of question k's image; `probe` is trained with the
    model and discarded afterwards."""
    params = list(model.parameters()) + (list(probe.parameters()) if probe is not None else [])
    optimizer = torch.optim.AdamW(params, lr=recipe.stage2_lr, weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(recipe.seed + 2)
    rng = random.Random(recipe.seed + 3)
    image_ids = sorted(questions_by_image)
    steps_per_epoch = math.ceil(len(image_ids) / recipe.images_per_step)
    total = recipe.stage2_epochs * steps_per_epoch
    step = 0
    for epoch in range(recipe.stage2_epochs):
        rng.shuffle(image_ids)
        seen = correct = 0
        start_time = time.time()
        for start in range(0, len(image_ids), recipe.images_per_step):
            batch_images = image_ids[start:start + recipe.images_per_step]
            owner, questions = [], []
            for slot, image_id in enumerate(batch_images):
                pool = questions_by_image[image_id]
                for q in rng.sample(pool, min(recipe.questions_per_image, len(pool))):
                    owner.append(slot)
                    questions.append(q)
            for group in optimizer.param_groups:
                group["lr"] = recipe.stage2_lr * _cosine(step, total, warmup=steps_per_epoch // 2)
            image_pixels = augment(pixels[[image_index[i] for i in batch_images]], generator, recipe.max_shift)
            loss, hits = answer_loss(image_pixels, torch.tensor(owner), questions)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            seen += len(questions)
            correct += hits
            step += 1
        log(f"stage 2 epoch {epoch + 1}/{recipe.stage2_epochs}: loss {loss.item():.3f}, train accuracy "
            f"{correct / seen:.3f}, {time.time() - start_time:.0f} s")
        if evaluate is not None:
            evaluate(epoch)


def presence_loss(probe: torch.nn.Module, states: torch.Tensor, questions: list[easy_vqa.Question]) -> torch.Tensor:
    """The auxiliary target of yes/no questions: whether the colour or shape they name is shown (the answer,
    flipped for a negated question), read linearly from `states` [N, D]. Without it a model learns the
    answers' prior (a named colour is absent seven times in eight) and, where the named colour is the shown
    one, the asserting and negated forms separately; with it both forms share one comparison."""
    targets = torch.tensor([int((q.answer == "yes") != easy_vqa.is_negated(q.question)) if q.kind == "yes/no"
                            else -100 for q in questions])
    if not (targets >= 0).any():
        return states.new_zeros(())
    return F.cross_entropy(probe(states), targets, ignore_index=-100)


def blip_answer_loss(model, tokenizer, probe: torch.nn.Module | None = None, presence_weight: float = 0.0):
    """BLIP's stage-2 forward: the vision pass once per image, shared by its questions; the presence probe
    reads the text encoder's [CLS] state, which the answer decoder reads too."""
    sep = tokenizer.sep_token_id

    def answer_loss(image_pixels: torch.Tensor, owner: torch.Tensor, questions: list[easy_vqa.Question]):
        enc = encode_questions(tokenizer, [q.question for q in questions])
        answer_ids = tokenizer([q.answer for q in questions], add_special_tokens=False)["input_ids"]
        first = torch.tensor([ids[0] for ids in answer_ids])
        image_states = model.vision_model(pixel_values=image_pixels).last_hidden_state
        question_states = model.text_encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                             encoder_hidden_states=image_states[owner]).last_hidden_state
        decoder_ids = torch.stack([torch.full_like(first, tokenizer.bos_token_id), first], dim=1)
        logits = model.text_decoder(input_ids=decoder_ids, encoder_hidden_states=question_states,
                                    encoder_attention_mask=enc["attention_mask"]).logits
        # answers are one wordpiece in this vocabulary: predict it, then [SEP]
        loss = F.cross_entropy(logits[:, 0], first) + 0.5 * F.cross_entropy(logits[:, 1], torch.full_like(first, sep))
        if probe is not None:
            loss = loss + presence_weight * presence_loss(probe, question_states[:, 0], questions)
        return loss, int((logits[:, 0].argmax(1) == first).sum())

    return answer_loss


def training_questions(recipe) -> list[easy_vqa.Question]:
    """easy-VQA's training questions, two-way choice questions, and yes/no questions naming each image's
    own colour: easy-VQA asks those one time in eight, too rarely to teach the comparison they need."""
    return (easy_vqa.all_questions("train", recipe.choice_per_kind, seed=recipe.seed)
            + easy_vqa.shown_color_questions(easy_vqa.image_colors("train"), recipe.shown_color_per_image,
                                             seed=recipe.seed + 4))


def train_default(out_dir: Path, recipe: Recipe | None = None, log=print, eval_every_epoch: bool = False) -> dict:
    """Train the embedded default model from easy-VQA and save it (with processor) to `out_dir`."""
    recipe = recipe or Recipe()
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    started = time.time()
    out_dir = Path(out_dir)

    train_questions = training_questions(recipe)
    vocab = build_vocab(train_questions + list(easy_vqa.load_questions("test")))
    processor = build_processor(vocab, recipe.image_size, out_dir)
    tokenizer = processor.tokenizer
    model = build_model(recipe, len(vocab), {t: vocab.index(t) for t in SPECIAL_TOKENS})
    model.train()

    data = TrainingData.load(processor.image_processor, train_questions)
    log(f"easy-VQA train: {data.summary()}, vocabulary {len(vocab)}")
    train_stage1(model, recipe, data, log)
    pixels, image_index, questions_by_image = data.pixels, data.image_index, data.questions_by_image

    def evaluate(epoch: int) -> None:
        if eval_every_epoch:
            model.eval()
            result = evaluate_model(model, processor, "test", seed=recipe.seed, limit_images=300)
            log(f"  test (300 images): {json.dumps(result['accuracy'])}")
            model.train()

    probe = torch.nn.Linear(recipe.hidden, 2)
    run_stage2(model, recipe, pixels, image_index, questions_by_image,
               blip_answer_loss(model, tokenizer, probe, recipe.presence_weight), log, evaluate, probe)
    model.eval()
    minutes = (time.time() - started) / 60
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    log(f"trained in {minutes:.1f} min; saved to {out_dir}")
    return {"recipe": asdict(recipe), "train_minutes": round(minutes, 1), "vocab_size": len(vocab)}
