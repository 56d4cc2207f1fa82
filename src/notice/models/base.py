"""The adapter contract: everything code outside models/ may ask of a model family.

A family supplies facts, not math: its streams, a site map (where each stream's layers and
components live), how prompts are built and where positions are, and which shared block runner
(models/blocks/) each layer is. `ModelAdapter` turns those facts into the calls the rest of the
code makes: answers, runs, traces, hook points, head columns. Only `patched_logits`, the
plumbing between streams, is a family's own code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Hashable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from notice.errors import NoticeError
from notice.models.blocks import BertBlock, EncoderBlock
from notice.models.blocks.attention import AttentionInputs

ALL = "all"
ANSWER_SCORING = ("first_token", "sequence")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise NoticeError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


# ------------------------------------------------------------------------------ facts
@dataclass(frozen=True, order=True)
class Site:
    """Where a patch goes: `{stream}.{layer}.{component}[.head{h}]@{position}` (see patching/sites.py)."""

    stream: str
    layer: int
    component: str
    head: int | None = None
    position: int | str = ALL  # token/patch index, or "all"

    @property
    def name(self) -> str:
        return f"{self.module}@{self.position}"

    @property
    def module(self) -> str:
        """The site without its position: one module (or head) of the model."""
        head = f".head{self.head}" if self.head is not None else ""
        return f"{self.stream}.{self.layer}.{self.component}{head}"

    @property
    def target(self) -> str:
        """What the site overwrites in a trace: a component's write, the layer output, or per-head values ('.z')."""
        return self.component + (".z" if self.head is not None else "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class StreamFacts:
    """One transformer stack of a model (BLIP: vision, text encoder, answer decoder)."""

    name: str
    layers: int
    heads: int
    head_dim: int
    hidden: int
    components: tuple[str, ...]  # patchable parts of a layer, e.g. ("layer", "self_attn", "mlp")
    positions: str  # what a position indexes: "patch", "token" or "answer"
    description: str
    reads_answer: bool = False  # the model reads its answer logits at this stream's last position
    # Components that only some layers, or only the first rows, have (the Q-Former's query tokens
    # alone cross-attend the image, on every other layer): component → those layers / that row count.
    layers_of: Mapping[str, tuple[int, ...]] = field(default_factory=dict, hash=False)
    rows_of: Mapping[str, int] = field(default_factory=dict, hash=False)

    @classmethod
    def of(cls, name: str, config, components: tuple[str, ...], positions: str, description: str,
           layers: int | None = None, **facts) -> "StreamFacts":
        """A stack's facts read from its transformers config (layers, heads, width), e.g. a vision tower's."""
        heads = config.num_attention_heads
        return cls(name, layers or config.num_hidden_layers, heads, config.hidden_size // heads, config.hidden_size,
                   components, positions, description, **facts)

    def has(self, component: str, layer: int) -> bool:
        """Whether `layer` of this stream has `component`."""
        return component in self.components and layer in self.layers_of.get(component, range(self.layers))

    def rows(self, component: str, positions: int) -> int:
        """How many of an input's `positions` the component covers (all, or the first rows_of)."""
        return min(positions, self.rows_of.get(component, positions))


@dataclass(frozen=True)
class StreamMap:
    """Where a stream lives in the model, by module path (relative to the model; `{}` = a layer's own path).

    writes: component → the module whose output is its write into the residual stream.
    heads: attention component → the module whose input holds every head's values before the output
    projection, head h at columns [h*d, (h+1)*d). A layer's input and output ("x", "layer") are the
    layer module's own. `single`: `layers` names one module, the stream's only layer ("layer" alone).
    `flat`: components whose write module sees the positions of all rows flattened, [B*P, W] (OPT's MLP)."""

    layers: str
    writes: Mapping[str, str] = field(default_factory=dict)
    heads: Mapping[str, str] = field(default_factory=dict)
    single: bool = False
    flat: frozenset[str] = frozenset()


# --------------------------------------------------------------------------- patching
# What the patching engine exchanges with an adapter. The engine groups cells and keeps the
# books; the adapter runs its own model from a patched layer on (it alone knows modules).

@dataclass
class Run:
    """One or more inputs as the model receives them: the family's prepared batch, and per row a
    resolved Gaussian-noise spec (or None) for the embeddings of one stream (noise pairs)."""

    inputs: Any
    noise: Sequence[dict[str, Any] | None] | None = None

    def noise_of(self, row: int) -> dict[str, Any] | None:
        return None if self.noise is None else self.noise[row]


@dataclass
class Trace:
    """One plain forward of a Run, kept for patched runs: the answer logits of the model's own
    forward, every layer's intermediates by name, and family caches (keys/values a rerun reuses)."""

    logits: torch.Tensor  # [V] float32
    acts: dict[tuple[str, int], dict[str, torch.Tensor]]  # (stream, layer) → name → [P, W]
    cache: dict[str, Any] = field(default_factory=dict)
    num_positions: dict[str, int] = field(default_factory=dict)

    def nbytes(self) -> int:
        def tensors(value) -> list[torch.Tensor]:
            if isinstance(value, torch.Tensor):
                return [value]
            if isinstance(value, (list, tuple)):
                return [t for item in value for t in tensors(item)]
            return []

        found = [t for layer in self.acts.values() for t in layer.values()]
        found += [t for value in self.cache.values() for t in tensors(value)]
        return sum(t.numel() * t.element_size() for t in found)


@dataclass
class PatchBatch:
    """N cells that patch the same target of one layer, each at its own positions and columns.

    target: a component ("layer", "self_attn", "cross_attn", "mlp") or a component's per-head
    values before the output projection ("self_attn.z", "cross_attn.z").
    """

    stream: str
    layer: int
    target: str
    positions: torch.Tensor  # [N, K] long: the positions each cell patches
    columns: torch.Tensor | None = None  # [N, W] bool: columns taken from the source; None = all

    def __len__(self) -> int:
        return self.positions.shape[0]


@dataclass
class ImageAttention:
    """Attention of a model's text positions to its image tokens, for head-function analysis.

    weights: [layers, heads, queries, image tokens] float32 of the clean input, where the image tokens
    are the grid patches only (no [CLS]), in row-major order of `grid`; image_states [image tokens, D]:
    what those positions hold (outlier norms); query: the position head functions read; layers: which
    layers the first axis holds, where only some layers attend the image."""

    stream: str
    component: str
    weights: torch.Tensor
    image_states: torch.Tensor
    query: int
    grid: tuple[int, int]
    layers: tuple[int, ...] | None = None  # the stream's layers that `weights` covers; None: every layer


# ---------------------------------------------------------------------------- adapter
class ModelAdapter(ABC):
    """The declared contract between a model family and the rest of notice.

    Public members (everything outside models/ uses only these): `family`, `name`, `model`,
    `tokenizer`, `streams`, `cross_layer_streams`, `device`, `dtype`, `from_pretrained`,
    `answer_token_ids`, `token_length`, `length_key`, `tokenize`, `image_key`, `batches_by_length`,
    `answer_logits`, `score_answers`, `generate`, `runs_for`, `run_logits`, `num_positions`, `position_labels`,
    `resolve_noise`, `trace`, `patched_logits`, `hook_point`, `edit_site`, `stream_rows`, `site_columns`,
    `full_patch_sites`, `cell_bytes`, `parameter_bytes`, `image_attention`, `max_prompt_tokens`,
    `describe`, `first_patch`.
    A family implements the abstract members and sets `streams`, `stream_maps` and `blocks`.
    """

    family: ClassVar[str]
    model_class: ClassVar[str]  # the checkpoints' transformers class, by name (what from_pretrained loads)
    processor_class: ClassVar[str]
    cross_layer_streams: ClassVar[frozenset[str]] = frozenset()  # streams whose patched_logits mixes layers
    answer_batch_size: ClassVar[int] = 64
    trace_outputs: ClassVar[dict[str, str]] = {}  # cache name → module whose output (row 0) a trace keeps
    first_patch: ClassVar[int] = 1  # vision positions before the first grid patch (a [CLS] token); 0 without one

    streams: dict[str, StreamFacts]
    stream_maps: dict[str, StreamMap]
    blocks: dict[str, list]  # stream → one block runner (models/blocks) per layer

    def __init__(self, model, processor, name: str):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.name = name

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, source: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32",
                        name: str | None = None, **options) -> "ModelAdapter":
        """Load the unmodified transformers model (`model_class`) and processor from a hub id or a saved folder."""
        import transformers

        if options:
            raise NoticeError(f"{cls.model_class} loading takes no {', '.join(options)} option: drop it")
        model = getattr(transformers, cls.model_class).from_pretrained(str(source), dtype=resolve_dtype(dtype))
        return cls(model.to(device), cls.load_processor(source), name or str(source))

    @classmethod
    def load_processor(cls, source: str | Path):
        """The checkpoint's processor (tokenizer and image processor): `processor_class`'s."""
        import transformers

        return getattr(transformers, cls.processor_class).from_pretrained(str(source))

    @classmethod
    @abstractmethod
    def prompt_ids(cls, processor, question: str) -> list[int]:
        """The ids the model's text stream reads for a question: its whole prompt, image tokens expanded."""

    @classmethod
    def prompt_limit(cls, config) -> int:
        """The most positions a prompt may take (image tokens, template and question together)."""
        return int(getattr(config, "text_config", config).max_position_embeddings)

    @classmethod
    def prompt_budget(cls, source: str | Path) -> tuple[int, Callable[[str], int]]:
        """(prompt_limit, question → prompt length) from the config and processor alone, without weights."""
        from transformers import AutoConfig

        processor = cls.load_processor(source)
        return cls.prompt_limit(AutoConfig.from_pretrained(str(source))), lambda q: len(cls.prompt_ids(processor, q))

    @property
    def max_prompt_tokens(self) -> int:
        """The most positions a prompt may take (`token_length`); longer ones are refused at the boundary."""
        return self.prompt_limit(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    # ---------------------------------------------------------- prompts, answers
    @abstractmethod
    def prepare(self, images: Sequence[Image.Image], questions: Sequence[str]):
        """The family's prepared inputs for one batch of equal-length prompts (no padding ever)."""

    def input_row(self, inputs, row: int):
        """Row `row` of prepared inputs, as a batch of one."""
        return type(inputs)({key: value[row:row + 1] for key, value in inputs.items()})

    def _prompt_ids(self, question: str) -> list[int]:
        known = self.__dict__.setdefault("_known_prompts", {})  # batching asks for them often
        if question not in known:
            known[question] = self.prompt_ids(self.processor, question)
        return known[question]

    def tokenize(self, question: str) -> list[str]:
        """The tokens of a question's whole prompt as the model's text stream sees them (its positions)."""
        return self.tokenizer.convert_ids_to_tokens(self._prompt_ids(question))

    def token_length(self, question: str) -> int:
        return len(self._prompt_ids(question))

    def answer_token_ids(self, answer: str) -> list[int]:
        """Token ids of an answer as it follows the prompt, without special tokens."""
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise NoticeError(f"answer {answer!r} has no tokens: give a non-empty answer word")
        return ids

    @torch.no_grad()
    def generate(self, images: Sequence[Image.Image], questions: Sequence[str], max_new_tokens: int = 8) -> list[str]:
        """Free-form greedy answers, as transformers' `generate` gives them after the prompt (a family whose
        model answers otherwise overrides this)."""
        answers: list[str] = [""] * len(questions)
        for index in self.batches_by_length(questions, self.answer_batch_size, images):
            inputs = self.prepare([images[i] for i in index], [questions[i] for i in index])
            ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
            for i, text in zip(index, self.tokenizer.batch_decode(ids[:, inputs.input_ids.shape[1]:],
                                                                  skip_special_tokens=True)):
                answers[i] = text.strip()
        return answers

    def prompt_positions(self, question: str, positions: Sequence[int], run: Run | None = None) -> list[int]:
        """Positions of the question tokenized alone (as pairs store STR and text-noise sites) in the
        model's input (`run`'s, where the image's size moves them); the same for a model whose input is
        the question itself."""
        return list(positions)

    def length_key(self, question: str) -> Any:
        """What prompts of one batch must share so that nothing is padded: the token length (and the
        length of any second tokenization the model reads)."""
        return self.token_length(question)

    def image_key(self, image: Image.Image) -> Hashable:
        """What of an image decides how many positions it takes (None: every image takes the same;
        Qwen2-VL: its patch grid; LLaVA-NeXT: its size, which decides its tiles)."""
        return None

    def batches_by_length(self, questions: Sequence[str], batch_size: int,
                          images: Sequence[Image.Image] | None = None) -> list[list[int]]:
        """Index batches whose prompts share a token length (`length_key`) and, with `images`, whose images
        take the same positions (one `image_key`): no padding ever enters a forward."""
        groups: dict[tuple[Any, str], list[int]] = {}
        for i, question in enumerate(questions):
            key = None if images is None else self.image_key(images[i])
            groups.setdefault((self.length_key(question), repr(key)), []).append(i)
        return [idx[s:s + batch_size] for _, idx in sorted(groups.items()) for s in range(0, len(idx), batch_size)]

    @torch.no_grad()
    def answer_logits(self, images: Sequence[Image.Image], questions: Sequence[str], batch_size: int | None = None,
                      image_index: Sequence[int] | None = None) -> torch.Tensor:
        """The first answer token's logits over the vocabulary, [B, V] float32. With `image_index`,
        question i reads images[image_index[i]] and each image is encoded once for all its questions."""
        if image_index is None:
            image_index = range(len(questions))
        out: list[torch.Tensor | None] = [None] * len(questions)
        size = batch_size or self.answer_batch_size
        unique = sorted(set(image_index)) if len(set(image_index)) < len(questions) else None
        states = None
        if unique is not None:  # encode each image once
            states = {}
            for rows in self.batches_by_length(["?"] * len(unique), size, [images[i] for i in unique]):
                chunk = [unique[r] for r in rows]
                prepared = self.prepare([images[i] for i in chunk], ["?"] * len(chunk))
                for i, row in zip(chunk, self.encode_images(prepared, self.embed_images(prepared))):
                    states[i] = row
        for index in self.batches_by_length(questions, size, [images[i] for i in image_index]):
            inputs = self.prepare([images[image_index[i]] for i in index], [questions[i] for i in index])
            if states is None:
                logits = self.run_logits(Run(inputs))
            else:
                image_states = torch.stack([states[image_index[i]] for i in index])
                logits = self.logits_from_states(inputs, image_states, self.embed_tokens(inputs.input_ids)).float()
            for i, row in zip(index, logits):
                out[i] = row
        return torch.stack(out)  # type: ignore[arg-type]

    @torch.no_grad()
    def score_answers(self, images: Sequence[Image.Image], questions: Sequence[str], candidates: Sequence[str],
                      scoring: str = "first_token") -> torch.Tensor:
        """Log-probability of each candidate answer, [B, C].

        "first_token": log p of the candidate's first token at the first answer step (what the
        original research code used, silently). "sequence": the summed log p of all its tokens,
        teacher-forced; equal to "first_token" for one-token answers."""
        if scoring not in ANSWER_SCORING:
            raise NoticeError(f"unknown answer scoring {scoring!r}: use one of {', '.join(ANSWER_SCORING)}")
        candidate_ids = [self.answer_token_ids(c) for c in candidates]
        scores = torch.empty(len(questions), len(candidates))
        for index in self.batches_by_length(questions, self.answer_batch_size, images):
            context = self.answer_context(self.prepare([images[i] for i in index], [questions[i] for i in index]))
            for c, ids in enumerate(candidate_ids):
                use = ids[:1] if scoring == "first_token" else ids
                prefix = torch.tensor([use[:-1]] * len(index), dtype=torch.long, device=self.device)
                logp = torch.log_softmax(self.answer_step_logits(context, prefix).float(), dim=-1)  # [B, len(use), V]
                target = torch.tensor(use, device=self.device)
                scores[index, c] = logp[:, torch.arange(len(use)), target].sum(dim=1).cpu()
        return scores

    # --------------------------------------------------- the forward, in stages
    # A family's forward in four stages, so that noise can go on the embeddings and images can be
    # encoded once for many questions. run_logits composes them; it is what naive.py hooks into.
    @abstractmethod
    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image embeddings before the first vision layer, [B, I, Dv] (where image noise goes)."""

    @abstractmethod
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings before the first text layer, [B, T, D] (where text noise goes)."""

    @abstractmethod
    def encode_image(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Image embeddings → what the text side reads of the image."""

    def embed_images(self, inputs) -> torch.Tensor:
        """`embed_image` of prepared inputs' pixels, [B, I, Dv]. A family whose tower reads more of the
        inputs than the embeddings (each image's patch grid) overrides this and `encode_images`."""
        return self.embed_image(inputs.pixel_values)

    def encode_images(self, inputs, image_embeddings: torch.Tensor) -> torch.Tensor:
        """`encode_image` of prepared inputs' image embeddings (noise may be on them)."""
        return self.encode_image(image_embeddings)

    @abstractmethod
    def logits_from_states(self, inputs, image_states: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
        """First answer-step logits [B, V] from encoded images and token embeddings."""

    @abstractmethod
    def answer_context(self, inputs) -> Any:
        """What every answer step of these inputs reads (teacher-forced scoring)."""

    @abstractmethod
    def answer_step_logits(self, context, prefix: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1 + K, V] of the answer steps after a teacher-forced prefix [B, K]."""

    @property
    @abstractmethod
    def word_embeddings(self) -> torch.nn.Embedding:
        """The text stream's token embedding table."""

    @property
    def vocab_size(self) -> int:
        return int(self.word_embeddings.weight.shape[0])

    def embedding_sigma(self, stream: str, embeddings: torch.Tensor) -> float:
        """The scale of Gaussian-noise corruption: std of the token-embedding matrix (text, as in
        ROME's causal tracing) or of the given image's patch embeddings (vision, [CLS] excluded)."""
        if stream == "vision":
            return float(embeddings[:, self.first_patch:].detach().float().std())
        return float(self.word_embeddings.weight.detach().float().std())

    # -------------------------------------------------------------------- runs
    def runs_for(self, clean_image, corrupt_image, clean_prompt: str, corrupt_prompt: str,
                 noise: dict[str, Any] | None = None) -> tuple[Run, Run]:
        """The clean and the corrupt Run of one pair; `noise` (resolved, see resolve_noise) goes on the corrupt."""
        clean = self.prepare([clean_image], [clean_prompt])
        corrupt = self.prepare([corrupt_image], [corrupt_prompt])
        if clean.input_ids.shape != corrupt.input_ids.shape:
            raise NoticeError(f"clean prompt {clean_prompt!r} and corrupt prompt {corrupt_prompt!r} tokenize to "
                              f"{clean.input_ids.shape[1]} and {corrupt.input_ids.shape[1]} tokens: a pair needs "
                              "equal lengths")
        return Run(clean), Run(corrupt, [noise] if noise is not None else None)

    def run_logits(self, run: Run, grad: bool = False) -> torch.Tensor:
        """The plain forward of a run through the model's own modules: [B, V] float32 (differentiable with
        `grad`, for attribution patching)."""
        with torch.set_grad_enabled(grad):
            image, tokens = self.embed_images(run.inputs), self.embed_tokens(run.inputs.input_ids)
            if run.noise is not None:
                image, tokens = image.clone(), tokens.clone()
                for row, spec in enumerate(run.noise):
                    if spec is not None:
                        target = image if spec["stream"] == "vision" else tokens
                        target[row:row + 1] = add_noise(target[row:row + 1], spec,
                                                        self.embedding_sigma(spec["stream"], target[row:row + 1]))
            return self.logits_from_states(run.inputs, self.encode_images(run.inputs, image), tokens).float()

    @abstractmethod
    def num_positions(self, run: Run) -> dict[str, int]:
        """How many positions each stream has for this run (sites' @position ranges)."""

    @abstractmethod
    def position_labels(self, run: Run) -> dict[str, list[str]]:
        """A label per position of each stream (tokens, patch coordinates)."""

    # ------------------------------------------------------------------- noise
    def resolve_noise(self, spec: dict[str, Any], prompt: str, run: Run, mask: np.ndarray | None = None) -> dict[str, Any]:
        """A pair's stored noise spec with positions in the model's embeddings of its clean `run`: text
        positions are stored on the question tokenized alone; image positions "all" patches ([CLS]
        excluded) or "object", the patches the clean object's mask touches."""
        positions = spec["positions"]
        if spec["stream"] == "text":
            if positions == "all":
                positions = range(len(self.tokenizer(prompt)["input_ids"]))
            return dict(spec, positions=self.prompt_positions(prompt, list(positions), run))
        rows, cols, _ = self.patch_grid
        if positions == "all":
            positions = list(range(self.first_patch, self.first_patch + rows * cols))
        elif positions == "object":
            if mask is None:
                raise NoticeError("image noise on the 'object' needs the pair's clean_mask")
            positions = mask_patch_positions(mask, (rows, cols), self.first_patch)
        return dict(spec, positions=list(positions))

    @property
    @abstractmethod
    def patch_grid(self) -> tuple[int, int, int]:
        """(rows, columns, pixels per patch side) of the vision encoder's patches."""

    # ---------------------------------------------------------------- patching
    def layer_module(self, stream: str, layer: int) -> torch.nn.Module:
        where = self.stream_maps[stream]
        module = self.model.get_submodule(where.layers)
        return module if where.single else module[layer]

    def hook_point(self, site: Site) -> tuple[torch.nn.Module, str]:
        """The module whose output (or input, for heads) holds a site's activation, as [B, P, W]."""
        layer = self.layer_module(site.stream, site.layer)
        if site.component == "layer":
            return layer, "output"
        where = self.stream_maps[site.stream]
        if site.head is not None:
            return layer.get_submodule(where.heads[site.component]), "input"
        return layer.get_submodule(where.writes[site.component]), "output"

    def edit_site(self, site: Site, edit: Callable[[torch.Tensor], torch.Tensor], run: Run) -> list:
        """Hooks (each with `.remove()`) that run `edit(tensor [B, P, W]) -> tensor` on a site's activation in
        every forward of `run` (or of inputs shaped like it): the hook point's, an input's rows as one row
        (see `stream_rows`), viewed as [B, P, W] where its module sees positions flattened."""
        module, kind = self.hook_point(site)
        if site.component not in self.stream_maps[site.stream].flat or site.head is not None:
            return [edit_activation(module, kind, edit, self.stream_rows(site.stream, run))]
        batch: dict[str, int] = {}

        def remember(_module, args, kwargs):
            batch["rows"] = (args[0] if args else kwargs["hidden_states"]).shape[0]
        layer = self.layer_module(site.stream, site.layer)
        return [layer.register_forward_pre_hook(remember, with_kwargs=True, prepend=True),
                edit_activation(module, kind, lambda t: edit(t.view(batch["rows"], -1, t.shape[-1])).reshape(t.shape))]

    def site_columns(self, site: Site) -> slice | None:
        """The columns of a head's values before the output projection; None for whole components."""
        if site.head is None:
            return None
        d = self.streams[site.stream].head_dim
        return slice(site.head * d, (site.head + 1) * d)

    def stream_rows(self, stream: str, run: Run) -> int:
        """How many rows of the model's batch one input of `run` fills in a stream's layers: 1, or an
        image's tiles where a tower reads them as a batch (LLaVA-NeXT). The stream's positions then run
        over those rows' positions in order, and hooks and traces see them as one row."""
        return 1

    def traced_streams(self, streams: set[str]) -> set[str]:
        """The streams a trace must record for patches in `streams` (a family adds what its caches need)."""
        return set(streams)

    @torch.no_grad()
    def trace(self, run: Run, streams: set[str] | None = None) -> Trace:
        """The plain forward with hooks that keep, for every layer of `streams`, its input ("x"), output
        ("layer"), each component's write and each attention's per-head values ("<component>.z"), plus
        what the layer's block derives from them, and the family's caches for reruns."""
        streams = self.traced_streams(set(self.streams) if streams is None else set(streams))
        acts: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        kept: dict[str, torch.Tensor] = {}
        handles = [keep_output(self.model.get_submodule(path), kept, name) for name, path in self.trace_outputs.items()]
        for stream in (s for s in self.streams if s in streams):
            where, facts, rows = self.stream_maps[stream], self.streams[stream], self.stream_rows(stream, run)
            for l in range(facts.layers):
                store = acts.setdefault((stream, l), {})
                layer = self.layer_module(stream, l)
                if not where.single:
                    handles.append(keep_input(layer, store, "x", rows))
                handles.append(keep_output(layer, store, "layer", rows))
                for component, path in where.writes.items():
                    if facts.has(component, l):
                        handles.append(keep_output(layer.get_submodule(path), store, component, rows,
                                                   flat=component in where.flat))
                for component, path in where.heads.items():
                    if facts.has(component, l):
                        handles.append(keep_input(layer.get_submodule(path), store, f"{component}.z", rows))
        try:
            logits = self.run_logits(run)[0]
        finally:
            for handle in handles:
                handle.remove()
        for (stream, l), store in acts.items():
            for component in self.stream_maps[stream].flat & store.keys():  # row 0's positions come first
                store[component] = store[component][:store["x"].shape[0]]
            if not self.stream_maps[stream].single:
                self.blocks[stream][l].derive(store)
        return Trace(logits=logits, acts=acts, cache=self.trace_cache(run, acts, kept),
                     num_positions=self.num_positions(run))

    def trace_cache(self, run: Run, acts: dict[tuple[str, int], dict[str, torch.Tensor]],
                    kept: dict[str, torch.Tensor]) -> dict[str, Any]:
        """What patched reruns of this run reuse (keys and values of unchanged memories or prefixes);
        `kept` holds the outputs named in `trace_outputs`."""
        return dict(kept)

    @abstractmethod
    def patched_logits(self, receiving: Trace, source: Trace, batches: Sequence[PatchBatch]) -> torch.Tensor:
        """Answer logits [N, V] of patched copies of the receiving run, in the batches' order (one stream a
        call, and one layer unless the stream is in `cross_layer_streams`)."""

    def patched_layer(self, receiving: Trace, source: Trace, batch: PatchBatch, start: int = 0,
                      **context) -> torch.Tensor:
        """The patched layer's output at positions start.. [N, P-start, W]: the receiving run's, with the
        patched rows recomputed position-wise by the layer's block from the patched target."""
        from notice.models.blocks.rows import patched_value, scatter_rows

        key, index = (batch.stream, batch.layer), batch.positions  # index [N, K]
        mine, theirs = receiving.acts[key], source.acts[key]
        value = patched_value(theirs[batch.target], mine[batch.target], index, batch.columns)
        if self.stream_maps[batch.stream].single:
            rows = value
        else:
            rows = self.blocks[batch.stream][batch.layer].finish(batch.target, value, lambda name: mine[name][index],
                                                                 **context)
        return scatter_rows(mine["layer"][start:], index - start, rows)

    def attention_inputs(self, trace: Trace, stream: str, layer: int, component: str) -> AttentionInputs:
        """What one attention's heads read in a traced run (AtP*'s QK fix recomputes their patterns); the
        blocks that need nothing but the layer's input are answered here, a family answers the rest."""
        block, store = self.blocks[stream][layer], trace.acts[(stream, layer)]
        if isinstance(block, EncoderBlock):
            return block.attention_inputs(store["x"])
        if isinstance(block, BertBlock) and component == "self_attn":
            return block.self_inputs(store["x"])
        raise NoticeError(f"AtP* has no attention inputs for {stream}.{layer}.{component} of {self.family} models")

    @property
    def gradient_streams(self) -> tuple[str, ...]:
        """The streams that carry the answer, whose layers GradDrop visits (default: the one reading it)."""
        return tuple(name for name, facts in self.streams.items() if facts.reads_answer)

    @abstractmethod
    def full_patch_sites(self, modality: str) -> list[str]:
        """Sites whose full patch (every position) must turn the receiving run into the source run."""

    @abstractmethod
    def cell_bytes(self, stream: str, num_positions: dict[str, int]) -> int:
        """A generous estimate of the transient memory one patched cell needs (for batch sizing)."""

    # ---------------------------------------------------------- head functions
    @abstractmethod
    def image_attention(self, image: Image.Image, question: str, answer: str) -> ImageAttention:
        """The attention of the heads where text meets the image, to the image's grid patches."""

    # -------------------------------------------------------------------- facts
    def describe(self) -> dict:
        rows, cols, _ = self.patch_grid
        return {"family": self.family, "name": self.name, "image_tokens": self.image_token_count(),
                "patch_grid": [rows, cols], "vocab_size": self.vocab_size,
                "streams": {k: vars(v) for k, v in self.streams.items()}}

    def image_token_count(self) -> int:
        """How many positions the image takes where the text reads it."""
        rows, cols, _ = self.patch_grid
        return rows * cols


# ------------------------------------------------------------------------- helpers
def add_noise(embeddings: torch.Tensor, spec: dict[str, Any], sigma: float) -> torch.Tensor:
    """`embeddings` [B, N, D] with seeded Gaussian noise of `scale * sigma` at the spec's positions
    (resolved: a list, or "all"); the same noise on every row. The same seed gives the same noise."""
    positions = list(range(embeddings.shape[1])) if spec["positions"] == "all" else list(spec["positions"])
    generator = torch.Generator().manual_seed(int(spec["seed"]))
    noise = torch.randn(len(positions), embeddings.shape[-1], generator=generator) * (spec["scale"] * sigma)
    out = embeddings.clone()
    out[:, positions] += noise.to(embeddings.device, embeddings.dtype)
    return out


def mask_patch_positions(mask: np.ndarray, grid: tuple[int, int], first_patch: int = 1) -> list[int]:
    """Embedding positions of the patches a mask touches, for a patch grid over the whole resized image;
    [CLS] precedes the patches (first_patch = 1)."""
    rows, cols = grid
    height, width = mask.shape
    ys, xs = np.nonzero(mask > 0)
    touched = np.zeros(grid, dtype=bool)
    touched[np.minimum(ys * rows // height, rows - 1), np.minimum(xs * cols // width, cols - 1)] = True
    return [first_patch + int(i) for i in np.flatnonzero(touched.reshape(-1))]


def first_input(activation: torch.Tensor, rows: int = 1) -> torch.Tensor:
    """The first input's positions [P, W] of an activation as the model runs it: row 0 of [B, P, W];
    the first `rows` rows of [B * rows, P', W] in order (a tower reading an image's tiles as rows, see
    `stream_rows`); all of a packed [P, W] (Qwen2-VL's tower runs one image without a batch dimension)."""
    if activation.dim() == 2:
        return activation
    return activation[:rows].reshape(-1, activation.shape[-1])


def keep_output(module: torch.nn.Module, store: dict, name: str, rows: int = 1, flat: bool = False):
    """Keep a module's output (the first element of a tuple) of the first input under `name` (see
    `first_input`; `flat`: the whole output, rows flattened with positions, for the caller to cut).
    Prepended, so it runs before a model's own output-recording hooks (transformers 5 reads tower
    states through them)."""
    def hook(_module, _args, output):
        output = output[0] if isinstance(output, tuple) else output
        store[name] = (output if flat else first_input(output, rows)).detach()
    return module.register_forward_hook(hook, prepend=True)


def keep_input(module: torch.nn.Module, store: dict, name: str, rows: int = 1):
    """Keep a module's first input (positional or `hidden_states=`) of the first input under `name`."""
    def hook(_module, args, kwargs):
        store[name] = first_input(args[0] if args else kwargs["hidden_states"], rows).detach()
    return module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)


def edit_activation(module: torch.nn.Module, kind: str, edit: Callable[[torch.Tensor], torch.Tensor], rows: int = 1):
    """Run `edit(tensor [B, P, W]) -> tensor` on a module's output, or on its first input, in every forward;
    a module that reads each input as `rows` rows [B * rows, P', W] is edited as [B, rows * P', W], a
    packed [P, W] as a batch of one (see `first_input`)."""
    def folded(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 2:
            return edit(tensor[None])[0]
        if rows == 1:
            return edit(tensor)
        inputs, positions, width = tensor.shape[0] // rows, tensor.shape[1], tensor.shape[2]
        return edit(tensor.reshape(inputs, rows * positions, width)).reshape(inputs * rows, positions, width)

    if kind == "input":
        def before(_module, args, kwargs):
            if args:
                return (folded(args[0]),) + tuple(args[1:]), kwargs
            return args, dict(kwargs, hidden_states=folded(kwargs["hidden_states"]))
        return module.register_forward_pre_hook(before, with_kwargs=True, prepend=True)

    def after(_module, _args, output):
        if isinstance(output, tuple):
            return (folded(output[0]),) + tuple(output[1:])
        return folded(output)
    return module.register_forward_hook(after, prepend=True)


def grid_labels(rows: int, cols: int) -> list[str]:
    return [f"patch {i // cols},{i % cols}" for i in range(rows * cols)]


def check_batch(images: Sequence, questions: Sequence[str]) -> None:
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    for question in questions:
        if not question or not question.strip():
            raise NoticeError("empty question: ask something about the image, e.g. \"what color is the shape?\"")
