"""BLIP-2 and InstructBLIP (transformers' `Blip2ForConditionalGeneration`, `InstructBlipForConditionalGeneration`).

    pixel_values ──vision (ViT)──▶ image_states [B, 1+P, Dv]                       ([CLS] first)
    Q query tokens (+ the prompt's BERT wordpieces, InstructBLIP) ──Q-Former──▶ [B, Q(+T'), Dq]
        every layer: self-attention over all rows; the query rows alone cross-attend the image (on the
        layers l % cross_attention_frequency == 0) and pass the query FFN, the instruction rows the text FFN
    query rows ──projection──▶ features [B, Q, D]
    Q image tokens, BOS, prompt ──language model (OPT or Llama/Vicuna, causal)──▶ logits at the last position

Streams: `vision`, `qformer` (positions: the Q query tokens, then in InstructBLIP the instruction's
wordpieces; `cross_attn` exists only on the layers that have it, and only at the query tokens),
`projector` (one layer: the features, positions 0..Q-1) and `lm` (the expanded input ids). The LM
side is shared with the image-token families (models/image_tokens.py): the Q image tokens before
BOS are the LM's image positions. A head of the Q-Former is its slice before the output dense layer.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from PIL import Image

from notice.errors import NoticeError
from notice.models.base import (ImageAttention, PatchBatch, Run, Site, StreamFacts, StreamMap, Trace, edit_activation)
from notice.models.blip import STREAM_MAPS as BLIP_MAPS
from notice.models.blip import vit_block
from notice.models.blocks import CrossAttention, DecoderBlock, QFormerBlock
from notice.models.blocks.attention import AttentionInputs
from notice.models.image_tokens import ImageTokenAdapter, Prompt
from notice.models.llava import llama_block

# the language models notice runs: config model_type → (class, path of the decoder, stream map)
LANGUAGE_MODELS = {
    "opt": ("OPTForCausalLM", "language_model.model.decoder",
            StreamMap("language_model.model.decoder.layers", writes={"self_attn": "self_attn.out_proj", "mlp": "fc2"},
                      heads={"self_attn": "self_attn.out_proj"}, flat=frozenset({"mlp"}))),
    "llama": ("LlamaForCausalLM", "language_model.model",
              StreamMap("language_model.model.layers", writes={"self_attn": "self_attn.o_proj", "mlp": "mlp"},
                        heads={"self_attn": "self_attn.o_proj"})),
}
QFORMER_MAP = StreamMap("qformer.encoder.layer",
                        writes={"self_attn": "attention.output.dense", "cross_attn": "crossattention.output.dense",
                                "mlp": "output_query.dense"},  # the query rows' FFN; InstructBLIP adds the text FFN's
                        heads={"self_attn": "attention.output.dense", "cross_attn": "crossattention.output.dense"})


def qformer_block(layer, heads: int, queries: int, text_ffn: bool) -> QFormerBlock:
    attn, cross = layer.attention, layer.crossattention if layer.has_cross_attention else None
    text = dict(text_intermediate=layer.intermediate, text_output=layer.output.dense,
                text_output_norm=layer.output.LayerNorm) if text_ffn else {}
    crossing = None if cross is None else CrossAttention(cross.attention.query, cross.attention.key, cross.attention.value,
                                                         cross.output.dense, cross.output.LayerNorm)
    return QFormerBlock(query=attn.attention.query, key=attn.attention.key, value=attn.attention.value,
                        self_out=attn.output.dense, self_norm=attn.output.LayerNorm,
                        intermediate=layer.intermediate_query, output=layer.output_query.dense,
                        output_norm=layer.output_query.LayerNorm, heads=heads, crossing=crossing, queries=queries,
                        **text)


def opt_block(layer, heads: int) -> DecoderBlock:
    """OPT's pre-LayerNorm decoder layer: no rotary positions (they are learned and added to the input)."""
    attn = layer.self_attn
    return DecoderBlock(out=attn.out_proj, mlp_norm=layer.final_layer_norm,
                        mlp=torch.nn.Sequential(layer.fc1, layer.activation_fn, layer.fc2),
                        attn_norm=layer.self_attn_layer_norm, q_proj=attn.q_proj, k_proj=attn.k_proj, v_proj=attn.v_proj,
                        heads=heads, kv_heads=heads, head_dim=attn.head_dim, scale=attn.scaling)


def language_model_class(text_config) -> str:
    """The transformers class a VLM builds for its language model config."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)

    kind = text_config.model_type
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(kind) or MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.get(kind, kind)


class QFormerAdapter(ImageTokenAdapter):
    """What BLIP-2 and InstructBLIP share; a subclass names its classes, its prompt and what its Q-Former reads."""

    trace_outputs = {"image_states": "vision_model.post_layernorm"}
    prompt_format: ClassVar[str]  # the question in the prompt both the LM and (InstructBLIP) the Q-Former read
    reads_instruction: ClassVar[bool] = False  # the Q-Former reads the prompt beside its query tokens
    chat_prompts = False  # prompts are the paper's VQA format, not a chat template

    def __init__(self, model, processor, name: str):
        super().__init__(model, processor, name)
        config = model.config
        self.check_config(config, name)
        vision, qformer, text = config.vision_config, config.qformer_config, config.text_config
        self.lm_kind = text.model_type
        _, self.lm_path, lm_map = LANGUAGE_MODELS[self.lm_kind]
        self.image_token_id = int(config.image_token_id)
        self.queries = int(config.num_query_tokens)
        self.grid = vision.image_size // vision.patch_size
        qformer_layers = self.model.qformer.encoder.layer
        crossing = tuple(l for l, layer in enumerate(qformer_layers) if layer.has_cross_attention)
        heads, kv_heads = text.num_attention_heads, int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        readers = "the query tokens" + (", then the instruction's wordpieces" if self.reads_instruction else "")
        self.streams = {
            "vision": StreamFacts.of("vision", vision, ("layer", "self_attn", "mlp"), "patch",
                                     f"ViT image encoder over {self.grid ** 2 + 1} tokens ([CLS] + {self.grid}x{self.grid} "
                                     "patches)"),
            "qformer": StreamFacts.of("qformer", qformer, ("layer", "self_attn", "cross_attn", "mlp"),
                                      "query/instruction token" if self.reads_instruction else "query token",
                                      f"Q-Former over {readers}; the {self.queries} query tokens cross-attend the image "
                                      f"on layers {', '.join(map(str, crossing))}",
                                      layers_of={"cross_attn": crossing}, rows_of={"cross_attn": self.queries}),
            "projector": StreamFacts("projector", 1, 0, 0, text.hidden_size, ("layer",), "image token",
                                     f"language projection of the {self.queries} query outputs: the LM's image tokens"),
            "lm": StreamFacts("lm", text.num_hidden_layers, heads, head_dim, text.hidden_size,
                              ("layer", "self_attn", "mlp"), "token",
                              f"causal language model ({language_model_class(text)}) over the prompt, image tokens "
                              f"first; {heads} query heads share {kv_heads} key/value heads", reads_answer=True),
        }
        self.stream_maps = {"vision": BLIP_MAPS["vision"], "qformer": QFORMER_MAP,
                            "projector": StreamMap("language_projection", single=True), "lm": lm_map}
        self.blocks = {
            "vision": [vit_block(l, vision.num_attention_heads) for l in self.model.vision_model.encoder.layers],
            "qformer": [qformer_block(l, qformer.num_attention_heads, self.queries, self.reads_instruction)
                        for l in qformer_layers],
            "lm": [opt_block(l, heads) if self.lm_kind == "opt" else llama_block(l, heads, kv_heads)
                   for l in self.lm.layers],
        }

    # ----------------------------------------------------------------- loading
    @classmethod
    def check_config(cls, config, name: str) -> None:
        """A one-line refusal of a checkpoint whose language model notice cannot run."""
        text = config.text_config
        supported = " or ".join(entry[0] for entry in LANGUAGE_MODELS.values())
        if text.model_type not in LANGUAGE_MODELS:
            raise NoticeError(f"model {name!r}: its language model {language_model_class(text)} is not supported; notice "
                              f"runs {cls.model_class} with {supported} (decoder-only) language models")
        if text.model_type == "opt" and not text.do_layer_norm_before:
            raise NoticeError(f"model {name!r}: its OPT language model normalizes after each sublayer (as opt-350m), "
                              "which notice does not support; use a pre-LayerNorm OPT (opt-2.7b, opt-6.7b)")

    @classmethod
    def from_pretrained(cls, source: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32",
                        name: str | None = None, **options) -> "QFormerAdapter":
        from transformers import AutoConfig

        cls.check_config(AutoConfig.from_pretrained(str(source)), name or str(source))  # before the weights
        return super().from_pretrained(source, device, dtype, name, **options)  # type: ignore[return-value]

    @classmethod
    def prompt_budget(cls, source: str | Path) -> tuple[int, Callable[[str], int]]:
        from transformers import AutoConfig

        cls.check_config(AutoConfig.from_pretrained(str(source)), str(source))
        return super().prompt_budget(source)

    # ----------------------------------------------------------------- prompts
    def prompt(self, question: str) -> str:
        return self.prompt_format.format(question=question)

    @classmethod
    def prompt_ids(cls, processor, question: str) -> list[int]:
        """The LM's ids of a question's prompt: Q image tokens, then the tokenized prompt (BOS first)."""
        encoded = processor(images=[Image.new("RGB", (8, 8))], text=[cls.prompt_format.format(question=question)],
                            return_tensors="pt")
        return encoded["input_ids"][0].tolist()

    def instruction_length(self, question: str) -> int:
        """How many positions the prompt takes in the Q-Former beside the query tokens."""
        return 0

    def length_key(self, question: str) -> Any:
        return self.token_length(question), self.instruction_length(question)

    def runs_for(self, clean_image, corrupt_image, clean_prompt: str, corrupt_prompt: str,
                 noise: dict[str, Any] | None = None) -> tuple[Run, Run]:
        lengths = [self.instruction_length(p) for p in (clean_prompt, corrupt_prompt)]
        if lengths[0] != lengths[1]:
            raise NoticeError(f"clean prompt {clean_prompt!r} and corrupt prompt {corrupt_prompt!r} tokenize to {lengths[0]} "
                              f"and {lengths[1]} wordpieces in the Q-Former: a pair needs equal lengths")
        return super().runs_for(clean_image, corrupt_image, clean_prompt, corrupt_prompt, noise)

    # --------------------------------------------------------------- positions
    def image_token_count(self) -> int:
        return self.queries

    def feature_labels(self, run: Run | None = None) -> list[str]:
        return [f"query {i}" for i in range(self.queries)]

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        return self.grid, self.grid, self.model.config.vision_config.patch_size

    def num_positions(self, run: Run) -> dict[str, int]:
        counts = super().num_positions(run)
        return {"vision": counts["vision"], "qformer": len(self.qformer_labels(run)), "projector": counts["projector"],
                "lm": counts["lm"]}

    def position_labels(self, run: Run) -> dict[str, list[str]]:
        labels = super().position_labels(run)
        return {"vision": labels["vision"], "qformer": self.qformer_labels(run), "projector": labels["projector"],
                "lm": labels["lm"]}

    def qformer_labels(self, run: Run) -> list[str]:
        return self.feature_labels()

    # ------------------------------------------------------------------ stages
    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model.embeddings(pixel_values)

    def encode_image(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """The vision tower's output [B, 1+P, Dv], which the Q-Former cross-attends (with the prompt, it
        becomes the LM's image features: see `features`)."""
        vision = self.model.vision_model
        return vision.post_layernorm(vision.encoder(inputs_embeds=image_embeddings).last_hidden_state)

    @abstractmethod
    def run_qformer(self, inputs, image_states: torch.Tensor) -> torch.Tensor:
        """The Q-Former's output rows [B, Q(+T'), Dq], by the model's own modules."""

    def features(self, inputs, image_states: torch.Tensor) -> torch.Tensor:
        """The LM's image features [B, Q, D]: the Q-Former's query rows, projected."""
        return self.project(self.run_qformer(inputs, image_states)[:, :self.queries])

    def project(self, query_rows: torch.Tensor) -> torch.Tensor:
        projection = self.model.language_projection
        return projection(query_rows.to(projection.weight.dtype))

    def logits_from_states(self, inputs, image_states: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
        return super().logits_from_states(inputs, self.features(inputs, image_states), token_embeddings)

    def answer_context(self, inputs) -> Prompt:
        features = self.features(inputs, self.encode_images(inputs, self.embed_images(inputs)))
        return self.lm_prompt(inputs, self.embed_tokens(inputs.input_ids), features)

    def vision_rerun(self, hidden: torch.Tensor, layer: int, cache: dict | None = None) -> torch.Tensor:
        """The image states [N, 1+P, Dv] the Q-Former reads, from the vision stream's rows after `layer`."""
        for block in self.blocks["vision"][layer + 1:]:
            hidden = block.forward(hidden)
        return self.model.vision_model.post_layernorm(hidden)

    # ------------------------------------------------------------ the LM's facts
    def rope(self, cache: dict, start: int, count: int, layer: int):
        return None if self.lm_kind == "opt" else super().rope(cache, start, count, layer)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.final_layer_norm(hidden) if self.lm_kind == "opt" else super().final_norm(hidden)

    def lm_entry(self, features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """OPT adds its learned position embeddings to the input embeddings (image features included)."""
        if self.lm_kind != "opt":
            return features
        return features + self.lm.embed_positions(None, position_ids=positions[None]).to(features.dtype)

    # ---------------------------------------------------------------- patching
    def traced_streams(self, streams: set[str]) -> set[str]:
        return super().traced_streams(streams) | {"qformer"}

    def trace_cache(self, run: Run, acts, kept) -> dict:
        """Besides the LM's keys and values: the image's keys/values of each cross-attention layer of the
        Q-Former (reruns of the Q-Former read the unchanged image through them), and its input."""
        cache = dict(super().trace_cache(run, acts, kept), **kept)
        states = self.qformer_memory(kept["image_states"])
        cache["qformer_kv"] = [None if b.crossing is None else b.cross_kv(states) for b in self.blocks["qformer"]]
        cache["qformer_input"] = acts[("qformer", 0)]["x"]
        return cache

    def attention_inputs(self, trace: Trace, stream: str, layer: int, component: str) -> AttentionInputs:
        """The Q-Former's cross-attention heads: the query rows' queries over the image; the rest as inherited."""
        if stream != "qformer" or component != "cross_attn":
            return super().attention_inputs(trace, stream, layer, component)
        rows = trace.acts[("qformer", layer)]["after_self"][:self.queries]
        return self.blocks["qformer"][layer].cross_inputs(rows, self.qformer_memory(trace.cache["image_states"]))

    def qformer_memory(self, image_states: torch.Tensor) -> torch.Tensor:
        return image_states.to(self.model.qformer.encoder.layer[0].attention.output.dense.weight.dtype)

    @torch.no_grad()
    def patched_logits(self, receiving: Trace, source: Trace, batches: Sequence[PatchBatch]) -> torch.Tensor:
        """Vision and Q-Former cells rerun the Q-Former from their layer (all rows: self-attention mixes
        query and instruction rows), then the LM from its first image token; others as image-token LMs."""
        stream, layer = batches[0].stream, batches[0].layer
        if stream not in ("vision", "qformer"):
            return super().patched_logits(receiving, source, batches)
        assert all((b.stream, b.layer) == (stream, layer) for b in batches), "one stream and layer per call"
        if stream == "vision":
            hidden = torch.cat([self.patched_layer(receiving, source, b) for b in batches])
            memory: Any = self.qformer_memory(self.vision_rerun(hidden, layer, receiving.cache))  # per cell
            hidden, start = receiving.cache["qformer_input"].expand(hidden.shape[0], -1, -1), 0
        else:
            memory = receiving.cache["qformer_kv"]
            hidden = torch.cat([self.patched_layer(receiving, source, b, memory=memory[layer],
                                                   query_rows=b.positions < self.queries) for b in batches])
            start = layer + 1
        for l in range(start, self.streams["qformer"].layers):
            hidden = self.blocks["qformer"][l].forward(hidden, memory[l] if isinstance(memory, list) else memory)
        return self.logits_from_features(receiving, self.project(hidden[:, :self.queries]))

    def full_patch_sites(self, modality: str) -> list[str]:
        if modality != "image":
            return super().full_patch_sites(modality)
        last = self.streams["qformer"].layers - 1
        return ["vision.0.layer@all", f"qformer.{last}.layer@all"] + super().full_patch_sites(modality)[1:]

    def cell_bytes(self, stream: str, num_positions: dict[str, int]) -> int:
        floats = 0
        if stream in ("vision", "qformer"):  # a Q-Former rerun: its rows, FFNs and attention scores
            facts, rows = self.streams["qformer"], num_positions["qformer"]
            floats = 24 * rows * facts.hidden + 3 * facts.heads * rows * (rows + num_positions["vision"])
        return super().cell_bytes(stream, num_positions) + floats * max(self.dtype.itemsize, 4)

    # ---------------------------------------------------------- head functions
    @torch.no_grad()
    def image_attention(self, image: Image.Image, question: str, answer: str) -> ImageAttention:
        """The Q-Former's cross-attention to the grid patches ([CLS] dropped) on the layers that have it,
        averaged over the query tokens (each of them reads the image; none holds the answer word)."""
        run = Run(self.prepare([image], [question]))
        trace = self.trace(run, {"qformer"})
        states = self.qformer_memory(trace.cache["image_states"])[None]  # [1, 1+P, Dv]
        layers = self.streams["qformer"].layers_of["cross_attn"]
        blocks, queries = self.blocks["qformer"], self.queries
        weights = torch.stack([blocks[l].cross_weights(trace.acts[("qformer", l)]["after_self"][None, :queries], states)[0]
                               for l in layers])  # [Lc, H, Q, 1+P]
        return ImageAttention("qformer", "cross_attn", weights[..., 1:].mean(dim=2, keepdim=True),
                              states[0, 1:].float(), 0, (self.grid, self.grid), layers)


class Blip2Adapter(QFormerAdapter):
    """BLIP-2: the Q-Former reads its query tokens alone; prompts as in the BLIP-2 paper's VQA."""

    family = "blip-2"
    model_class = "Blip2ForConditionalGeneration"
    processor_class = "Blip2Processor"
    prompt_format = "Question: {question} Answer:"

    def run_qformer(self, inputs, image_states: torch.Tensor) -> torch.Tensor:
        queries = self.model.query_tokens.expand(image_states.shape[0], -1, -1)
        memory_mask = torch.ones(image_states.shape[:2], dtype=torch.long, device=image_states.device)
        return self.model.qformer(query_embeds=queries, encoder_hidden_states=image_states,
                                  encoder_attention_mask=memory_mask).last_hidden_state


class InstructBlipAdapter(QFormerAdapter):
    """InstructBLIP: the Q-Former reads the prompt (its own BERT wordpieces, `qformer_input_ids`) after the
    query tokens; those rows self-attend with the queries and pass the text FFN, never cross-attend."""

    family = "instructblip"
    model_class = "InstructBlipForConditionalGeneration"
    processor_class = "InstructBlipProcessor"
    prompt_format = "Question: {question} Short answer:"
    reads_instruction = True

    def instruction_length(self, question: str) -> int:
        return len(self.processor.qformer_tokenizer(self.prompt(question))["input_ids"])

    def prepare(self, images: Sequence[Image.Image], questions: Sequence[str]):
        encoded = super().prepare(images, questions)
        if not bool(encoded["qformer_attention_mask"].all()):
            raise ValueError("prompts of one batch must have the same Q-Former length; use batches_by_length")
        return encoded

    def qformer_labels(self, run: Run) -> list[str]:
        tokens = self.processor.qformer_tokenizer.convert_ids_to_tokens(run.inputs.qformer_input_ids[0].tolist())
        return self.feature_labels() + tokens

    def run_qformer(self, inputs, image_states: torch.Tensor) -> torch.Tensor:
        queries = self.model.query_tokens.expand(image_states.shape[0], -1, -1)
        mask = torch.cat([torch.ones(queries.shape[:2], dtype=torch.long, device=queries.device),
                          inputs.qformer_attention_mask], dim=1)
        memory_mask = torch.ones(image_states.shape[:2], dtype=torch.long, device=image_states.device)
        return self.model.qformer(input_ids=inputs.qformer_input_ids, attention_mask=mask, query_embeds=queries,
                                  encoder_hidden_states=image_states, encoder_attention_mask=memory_mask).last_hidden_state

    def edit_site(self, site: Site, edit: Callable[[torch.Tensor], torch.Tensor], run: Run) -> list:
        """The Q-Former's `mlp` is two modules' writes, the query FFN's rows then the text FFN's: `edit` sees
        both at once, at the query FFN's hook (the text FFN's write is computed there from its input, as the
        model is about to), and the text FFN's output is replaced by the edited rows."""
        if site.stream != "qformer" or site.component != "mlp":
            return super().edit_site(site, edit, run)
        layer: Any = self.layer_module(site.stream, site.layer)
        q, held = self.queries, {}

        def keep_text_input(_module, _args, output):
            held["text_input"] = output[:, q:]

        def both(query_write: torch.Tensor) -> torch.Tensor:
            text_write = layer.output.dense.forward(layer.intermediate(held.pop("text_input")))  # .forward: no hooks
            edited = edit(torch.cat([query_write, text_write], dim=1))
            held["text_write"] = edited[:, q:]
            return edited[:, :q]
        return [layer.attention.register_forward_hook(keep_text_input, prepend=True),
                edit_activation(layer.output_query.dense, "output", both),
                edit_activation(layer.output.dense, "output", lambda _write: held.pop("text_write"))]
