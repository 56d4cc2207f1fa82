"""What every model adapter tells the rest of the code, so nothing else hard-codes shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

ANSWER_SCORING = ("first_token", "sequence")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


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


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    from notice.errors import NoticeError

    if dtype not in DTYPES:
        raise NoticeError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


# ------------------------------------------------------------------ patching
# What the patching engine exchanges with an adapter. The engine groups cells and keeps
# the books; the adapter runs its own model from a patched layer on (it alone knows modules).

@dataclass
class Run:
    """One side of a pair as the model receives it: prepared inputs, and the Gaussian-noise spec
    (corrupt.noise) applied to one stream's embeddings for noise pairs."""

    inputs: Any  # the adapter's prepared batch of one (BLIP: BlipInputs)
    noise: dict[str, Any] | None = None


@dataclass
class Trace:
    """One plain forward of a Run, kept for patched runs: the answer logits of the model's own
    forward, every layer's intermediates by name, and adapter caches (cross-attention K/V)."""

    logits: torch.Tensor  # [V] float32
    acts: dict[tuple[str, int], dict[str, torch.Tensor]]  # (stream, layer) → name → [P, W]
    cache: dict[str, Any] = field(default_factory=dict)
    num_positions: dict[str, int] = field(default_factory=dict)

    def nbytes(self) -> int:
        tensors = [t for layer in self.acts.values() for t in layer.values()]
        tensors += [t for t in self.cache.values() if isinstance(t, torch.Tensor)]
        tensors += [t for v in self.cache.values() if isinstance(v, (list, tuple)) for kv in v for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors)


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


@runtime_checkable
class Patchable(Protocol):
    """What the patching engine needs from a model adapter (BLIP now; a causal LM with KV-prefix
    reuse fits the same calls)."""

    streams: dict[str, StreamFacts]
    cross_layer_streams: frozenset[str]  # streams where one patched_logits call may mix layers

    def runs_for(self, clean_image, corrupt_image, clean_prompt: str, corrupt_prompt: str,
                 noise: dict[str, Any] | None) -> tuple[Run, Run]: ...
    def run_logits(self, run: Run) -> torch.Tensor: ...  # [1, V] float32, the plain forward
    def trace(self, run: Run, streams: set[str]) -> Trace: ...
    def patched_logits(self, receiving: Trace, source: Trace, batches: Sequence[PatchBatch]) -> torch.Tensor: ...  # [N, V]
    def hook_point(self, site) -> tuple[torch.nn.Module, str]: ...  # module, "output" | "input"
    def site_columns(self, site) -> slice | None: ...
    def num_positions(self, prompt: str) -> dict[str, int]: ...
    def position_labels(self, run: Run) -> dict[str, list[str]]: ...
    def full_patch_sites(self, modality: str) -> list[str]: ...
    def cell_bytes(self, stream: str, num_positions: dict[str, int]) -> int: ...


class AdapterCommon:
    """What every family's adapter does the same way: answers in batches of equal-length prompts,
    and a pair as two runs (equal token lengths; a noise pair's noise on the corrupt embeddings)."""

    text_stream = "text"  # the stream whose embeddings text noise goes on
    cross_layer_streams: frozenset[str] = frozenset()  # streams whose patched_logits takes several layers
    answer_batch_size = 64

    @property
    def max_prompt_tokens(self) -> int:
        """The most positions a prompt may take (`token_length`); longer ones are refused at the boundary."""
        return self.prompt_limit(self.model.config)

    @torch.no_grad()
    def answer_logits(self, images: Sequence, questions: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """The first answer token's logits over the vocabulary, [B, V] float32."""
        out: list[torch.Tensor | None] = [None] * len(questions)
        for index in self.batches_by_length(questions, batch_size or self.answer_batch_size):
            inputs = self.prepare([images[i] for i in index], [questions[i] for i in index])
            for i, row in zip(index, self.logits_from_inputs(inputs)):
                out[i] = row
        return torch.stack(out)  # type: ignore[arg-type]

    @torch.no_grad()
    def score_answers(self, images: Sequence, questions: Sequence[str], candidates: Sequence[str],
                      scoring: str = "first_token") -> torch.Tensor:
        """Log-probability of each candidate answer, [B, C].

        "first_token": log p of the candidate's first token at the first answer step (what the
        original research code used, silently). "sequence": the summed log p of all its tokens,
        teacher-forced; equal to "first_token" for one-token answers."""
        from notice.errors import NoticeError

        if scoring not in ANSWER_SCORING:
            raise NoticeError(f"unknown answer scoring {scoring!r}: use one of {', '.join(ANSWER_SCORING)}")
        candidate_ids = [self.answer_token_ids(c) for c in candidates]
        scores = torch.empty(len(questions), len(candidates))
        for index in self.batches_by_length(questions, self.answer_batch_size):
            context = self.answer_context(self.prepare([images[i] for i in index], [questions[i] for i in index]))
            for c, ids in enumerate(candidate_ids):
                use = ids[:1] if scoring == "first_token" else ids
                prefix = torch.tensor([use[:-1]] * len(index), dtype=torch.long, device=self.device)
                logp = torch.log_softmax(self.answer_step_logits(context, prefix).float(), dim=-1)  # [B, len(use), V]
                target = torch.tensor(use, device=self.device)
                scores[index, c] = logp[:, torch.arange(len(use)), target].sum(dim=1).cpu()
        return scores

    def prompt_positions(self, question: str, positions: Sequence[int]) -> list[int]:
        """Positions of the question tokenized alone (as pairs store STR and text-noise sites) in
        the model's input; the same for a model whose input is the question itself."""
        return list(positions)

    def batches_by_length(self, questions: Sequence[str], batch_size: int) -> list[list[int]]:
        """Index batches whose prompts share a token length: no padding ever enters a forward
        (BLIP's answer step sees padded questions; padding would shift LLaVA's RoPE positions)."""
        groups: dict[int, list[int]] = {}
        for i, question in enumerate(questions):
            groups.setdefault(self.token_length(question), []).append(i)
        return [idx[s:s + batch_size] for _, idx in sorted(groups.items()) for s in range(0, len(idx), batch_size)]

    def runs_for(self, clean_image, corrupt_image, clean_prompt: str, corrupt_prompt: str,
                 noise: dict[str, Any] | None = None) -> tuple[Run, Run]:
        from notice.errors import NoticeError

        clean = self.prepare([clean_image], [clean_prompt])
        corrupt = self.prepare([corrupt_image], [corrupt_prompt])
        if clean.input_ids.shape != corrupt.input_ids.shape:
            raise NoticeError(f"clean prompt {clean_prompt!r} and corrupt prompt {corrupt_prompt!r} tokenize to "
                              f"{clean.input_ids.shape[1]} and {corrupt.input_ids.shape[1]} tokens: a pair needs "
                              "equal lengths")
        return Run(clean), Run(corrupt, noise)

    def _embeddings(self, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
        """Image embeddings [1, I, Dv] and token embeddings [1, T, D] of a run, with its noise added."""
        from notice.corrupt.noise import add_noise

        image = self.embed_image(run.inputs.pixel_values)
        tokens = self.embed_question(run.inputs.input_ids)
        if run.noise is not None:
            if run.noise["stream"] == "vision":
                image = add_noise(image, run.noise, sigma=self.embedding_sigma("vision", image))
            else:
                tokens = add_noise(tokens, run.noise, sigma=self.embedding_sigma(self.text_stream, tokens))
        return image, tokens
