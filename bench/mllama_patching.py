"""Llama-3.2-Vision patching: the research code's way (three full forwards per cell) versus the engine, on a
sweep of the language model's cross-attention heads at every prompt token, in one run.

Geometries (random-init weights built here; the compute does not depend on the weights):

- `llama-3.2-11b-vision-tokens`: Llama-3.2-11B-Vision's token geometry (560 px tiles in 14 px patches,
  4 tiles: 4 × 1601 image states the text cross-attends, the towers over 4 × 1608 padded positions;
  vocabulary 128256; the Instruct chat prompt; 32 query heads over 8 key/value heads) with its widths
  and depths shrunk: local vision encoder 4 of 32 layers (all 4 outputs kept, as 5 of the 32 are),
  global encoder 1 of 8, width 256 (1280), MLP 1024 (5120); language model 4 of 40 layers with
  cross-attention on 2 (8 of 40), width 512 (4096), MLP 1792 (14336).
- `tiny`: the contract suite's tiny mllama sizes.

Matrices are redrawn at unit gain and the tanh gates set to 1 so that patches visibly move the logits.
Both ways run on the same model object, float32. Prints JSON: time and measured FLOPs per cell both
ways, their agreement, and an analytic projection for Llama-3.2-11B-Vision at its full size.

    PYTHONPATH=src python bench/mllama_patching.py [--geometry llama-3.2-11b-vision-tokens|tiny] [--cells 24]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from research_way import color_pair, cross_head_sweep

from notice.models.mllama import MllamaAdapter

GEOMETRIES = {
    "llama-3.2-11b-vision-tokens": dict(image_size=560, patch_size=14, tiles=4, vision_hidden=256, vision_layers=4,
                                        global_layers=1, vision_heads=16, vision_mlp=1024, kept=(0, 1, 2, 3),
                                        text_hidden=512, text_layers=4, cross_layers=(1, 3), text_heads=32,
                                        text_kv_heads=8, text_mlp=1792, vocab=128256),
    "tiny": dict(image_size=32, patch_size=8, tiles=1, vision_hidden=32, vision_layers=3, global_layers=1,
                 vision_heads=2, vision_mlp=64, kept=(0, 2), text_hidden=32, text_layers=4, cross_layers=(1, 2),
                 text_heads=4, text_kv_heads=2, text_mlp=64, vocab=64),
}
# Llama-3.2-Vision-Instruct's prompt for one user turn, as its chat template writes it
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|image|>{% elif item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
SPECIAL = ["<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", "<|start_header_id|>", "<|end_header_id|>"]


def word_tokenizer(vocab_size: int):
    """A tokenizer whose words (and the blank line after each header) are whole tokens, as Llama 3's are for
    this prompt; <|image|> at id `vocab_size`, one past the LM head, as in the real checkpoints."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "user assistant what color is the shape ? red blue".split() + ["\n\n"]
    vocab = {t: i for i, t in enumerate(["<unk>"] + SPECIAL + words)} | {"<|image|>": vocab_size}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(" +"), "removed"),
                                                     pre_tokenizers.Split(Regex(r"\n\n|[^\w\s]"), "isolated")])
    backend.add_special_tokens(SPECIAL + ["<|image|>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   unk_token="<unk>", pad_token="<|finetune_right_pad_id|>",
                                   extra_special_tokens={"image_token": "<|image|>"}, model_max_length=128)


def build(geometry: dict) -> MllamaAdapter:
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import (MllamaImageProcessorPil,
                                                                          get_all_supported_aspect_ratios)

    tokenizer, size, tiles = word_tokenizer(geometry["vocab"]), geometry["image_size"], geometry["tiles"]
    processor = MllamaProcessor(image_processor=MllamaImageProcessorPil(size={"height": size, "width": size},
                                                                        max_image_tiles=tiles),
                                tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    vision = dict(image_size=size, patch_size=geometry["patch_size"], max_num_tiles=tiles,
                  hidden_size=geometry["vision_hidden"], num_hidden_layers=geometry["vision_layers"],
                  num_global_layers=geometry["global_layers"], attention_heads=geometry["vision_heads"],
                  intermediate_size=geometry["vision_mlp"], intermediate_layers_indices=list(geometry["kept"]),
                  vision_output_dim=geometry["vision_hidden"] * (1 + len(geometry["kept"])),
                  supported_aspect_ratios=[list(r) for r in get_all_supported_aspect_ratios(tiles)])
    text = dict(vocab_size=geometry["vocab"], hidden_size=geometry["text_hidden"],
                num_hidden_layers=geometry["text_layers"], cross_attention_layers=list(geometry["cross_layers"]),
                num_attention_heads=geometry["text_heads"], num_key_value_heads=geometry["text_kv_heads"],
                intermediate_size=geometry["text_mlp"], max_position_embeddings=2048, tie_word_embeddings=False,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(MllamaConfig(vision_config=vision, text_config=text,
                                                        image_token_index=geometry["vocab"])).eval()
    with torch.no_grad():  # unit gain and open gates, so that image and patches visibly move the logits
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0, param.shape[1] ** -0.5)
            elif name.endswith(("gate", "gate_attn", "gate_ffn")):
                param.fill_(1.0)
    return MllamaAdapter(model, processor, "mllama-geometry")


def llama_11b_vision_flops(tokens: int) -> dict:
    """Analytic matmul FLOPs of Llama-3.2-11B-Vision at full size: a forward as transformers runs it (both
    towers over 4 tiles, logits at every position), and a cross-attention head cell as the engine runs it
    (the patched row finishes its layer; the rows from the patched position on rerun the later layers over
    the cached prompt keys/values and image keys/values; logits at the last position), averaged over the
    8 cross-attention layers and the prompt positions."""
    vd, vff, local, glob, kept, positions = 1280, 5120, 32, 8, 5, 4 * 1608
    d, kvd, ff, layers, cross, vocab, memory = 4096, 1024, 14336, 40, range(3, 40, 5), 128256, 4 * 1601
    tower = (local + glob) * (positions * 2 * (4 * vd * vd + 2 * vd * vff) + 4 * positions * positions * vd)
    projector = memory * 2 * (1 + kept) * vd * d

    def layer(l: int, rows: int, image_kv: bool) -> int:
        mlp = rows * 2 * 3 * d * ff
        if l in cross:  # queries and output; the image's keys/values unless cached
            return mlp + rows * 2 * 2 * d * d + 4 * rows * memory * d + (memory * 2 * 2 * d * kvd if image_kv else 0)
        return mlp + rows * 2 * (2 * d * d + 2 * d * kvd) + 4 * rows * tokens * d

    full = tower + projector + sum(layer(l, tokens, True) for l in range(layers)) + tokens * 2 * d * vocab
    cells = [sum(layer(k, tokens - p, False) for k in range(l + 1, layers)) + (tokens - p) * 2 * 3 * d * ff
             + 2 * d * vocab for l in cross for p in range(tokens)]
    return {"lm_tokens": tokens, "image_states": memory, "full_forward": full, "research_cell": 3 * full,
            "engine_cell_lm_cross_head": statistics.mean(cells)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--geometry", choices=list(GEOMETRIES), default="llama-3.2-11b-vision-tokens")
    parser.add_argument("--cells", type=int, default=24, help="cells timed both ways, spread evenly over the sweep")
    parser.add_argument("--research-cells", type=int, default=4, help="of those, cells timed the research way")
    parser.add_argument("--repeats", type=int, default=3, help="engine timings repeated; the median is kept")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    adapter = build(GEOMETRIES[args.geometry])
    build_seconds = time.perf_counter() - started
    pictures, question = color_pair()
    clean, corrupt = adapter.runs_for(*pictures, question, question)

    count = adapter.num_positions(clean)["lm"]
    report = {"geometry": args.geometry, "threads": args.threads, "build_seconds": round(build_seconds, 1),
              "image_states": adapter.image_token_count(),
              **cross_head_sweep(adapter, clean, corrupt, "lm", count, args.cells, args.repeats, args.research_cells)}
    big = llama_11b_vision_flops(tokens=count)
    report["llama-3.2-11b-vision projection"] = {**big, "flops_ratio": big["research_cell"] / big["engine_cell_lm_cross_head"]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
