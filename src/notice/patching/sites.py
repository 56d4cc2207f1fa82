"""Site names: where a patch goes, the same vocabulary for every model family.

    {stream}.{layer}.{component}[.head{h}]@{position}

    text.5.cross_attn.head3@7    head 3 of layer 5's cross-attention, question token 7
    vision.2.mlp@all             layer 2's MLP output at every image token
    decoder.0.layer@0            the answer decoder's first layer at the [DEC] token

Components are a layer's writes into the residual stream ("self_attn", "cross_attn",
"mlp"; each before its residual add), the layer's output ("layer"), or one head of an
attention ("self_attn.head3": the head's slice of the values before the output projection).
Patterns use `*` for any layer, head or position: `text.*.cross_attn.head*`; `@last` is each
input's last position of the stream, and `@answer` the position the answer is read at, in the
streams that have one (BLIP's decoder, LLaVA's language model): `lm.*.self_attn.head*@answer`.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from notice.errors import NoticeError
from notice.models.base import ALL, Site, StreamFacts

__all__ = ["ALL", "Site", "expand_sites", "parse_site", "site_catalogue", "validate_site"]

_SITE_RE = re.compile(r"^(?P<stream>[a-z_]+)\.(?P<layer>\d+)\.(?P<component>[a-z_]+)"
                      r"(?:\.head(?P<head>\d+))?(?:@(?P<position>\d+|all))?$")
_PATTERN_RE = re.compile(r"^(?P<stream>[a-z_*]+)\.(?P<layer>\d+|\*)\.(?P<component>[a-z_*]+)"
                         r"(?:\.head(?P<head>\d+|\*))?(?:@(?P<position>\d+|all|last|answer|\*))?$")


def parse_site(text: str) -> Site:
    match = _SITE_RE.match(text.strip())
    if not match:
        raise NoticeError(f"bad site name {text!r}: write stream.layer.component[.headH]@position, "
                          "e.g. text.3.cross_attn.head2@5")
    position = match["position"] or ALL
    return Site(match["stream"], int(match["layer"]), match["component"],
                int(match["head"]) if match["head"] is not None else None,
                position if position == ALL else int(position))


def validate_site(site: Site, streams: Mapping[str, StreamFacts], num_positions: Mapping[str, int]) -> None:
    """Raise a one-line error listing the valid choices when `site` does not exist in the model."""
    if site.stream not in streams:
        raise NoticeError(f"unknown stream {site.stream!r} in site {site.name}: valid streams are {', '.join(streams)}")
    facts = streams[site.stream]
    if not 0 <= site.layer < facts.layers:
        raise NoticeError(f"layer {site.layer} out of range in site {site.name}: {site.stream} has layers 0..{facts.layers - 1}")
    if site.component not in facts.components:
        raise NoticeError(f"unknown component {site.component!r} in site {site.name}: "
                          f"{site.stream} has {', '.join(facts.components)}")
    if site.head is not None:
        if not site.component.endswith("attn"):
            raise NoticeError(f"site {site.name}: heads exist only on attention components "
                              f"({', '.join(c for c in facts.components if c.endswith('attn'))})")
        if not 0 <= site.head < facts.heads:
            raise NoticeError(f"head {site.head} out of range in site {site.name}: {site.stream} has heads 0..{facts.heads - 1}")
    if site.position != ALL:
        count = num_positions[site.stream]
        if not 0 <= int(site.position) < count:
            raise NoticeError(f"position {site.position} out of range in site {site.name}: "
                              f"{site.stream} has positions 0..{count - 1} for this input")


def check_pattern(pattern: str) -> re.Match:
    """The parts of one site pattern, or a one-line error that shows how to write one."""
    match = _PATTERN_RE.match(pattern.strip())
    if not match:
        raise NoticeError(f"bad site pattern {pattern!r}: write stream.layer.component[.headH]@position with * "
                          "for any, e.g. text.*.cross_attn.head*@* or lm.*.self_attn.head*@answer")
    return match


def expand_sites(patterns: Iterable[str], streams: Mapping[str, StreamFacts],
                 num_positions: Mapping[str, int]) -> list[Site]:
    """Every concrete site matched by the patterns, in a stable order, without duplicates.

    A pattern without `@` means every position ("@*"); `@all` means the whole stream at once;
    `@last` the stream's last position for this input; `@answer` the same in a stream that reads the answer.
    """
    out: dict[Site, None] = {}
    for pattern in patterns:
        pattern = pattern.strip()
        if not pattern:
            continue
        match = check_pattern(pattern)
        stream_names = list(streams) if match["stream"] == "*" else [match["stream"]]
        found = False
        for stream in stream_names:
            if stream not in streams:
                raise NoticeError(f"unknown stream {stream!r} in {pattern!r}: valid streams are {', '.join(streams)}")
            facts = streams[stream]
            layers = range(facts.layers) if match["layer"] == "*" else [int(match["layer"])]
            components = facts.components if match["component"] == "*" else (match["component"],)
            position_key = match["position"] or "*"
            if position_key == "answer" and not facts.reads_answer:
                if match["stream"] == "*":
                    continue
                readers = ", ".join(name for name, f in streams.items() if f.reads_answer) or "no stream of this model"
                raise NoticeError(f"{pattern!r}: the {stream} stream has no answer position; the answer is read in "
                                  f"{readers}; write @last or a position number for {stream}")
            positions: list[int | str] = (list(range(num_positions[stream])) if position_key == "*"
                                          else [num_positions[stream] - 1] if position_key in ("last", "answer")
                                          else [ALL] if position_key == ALL else [int(position_key)])
            for layer in layers:
                for component in components:
                    if match["head"] is None:
                        heads: list[int | None] = [None]
                    elif not component.endswith("attn"):
                        if match["component"] != "*":  # asked for heads of a component that has none
                            validate_site(Site(stream, layer, component, 0, ALL), streams, num_positions)
                        continue
                    else:
                        heads = list(range(facts.heads)) if match["head"] == "*" else [int(match["head"])]
                    for head in heads:
                        for position in positions:
                            site = Site(stream, layer, component, head, position)
                            validate_site(site, streams, num_positions)
                            out[site] = None
                            found = True
        if not found:
            raise NoticeError(f"site pattern {pattern!r} matches nothing in this model")
    return list(out)


def check_patterns(patterns: Iterable[str], streams: Mapping[str, StreamFacts],
                   num_positions: Mapping[str, int]) -> None:
    """Check patterns against a model's streams before its inputs are at hand (with `num_positions` of
    any prompt): position numbers are checked per input later, once their lengths are known."""
    expand_sites([re.sub(r"@\d+$", "@0", pattern.strip()) for pattern in patterns], streams, num_positions)


def site_catalogue(streams: Mapping[str, StreamFacts]) -> list[str]:
    """Human-readable list of the site patterns a model offers (for `notice info`)."""
    lines = []
    for facts in streams.values():
        last = facts.layers - 1
        for component in facts.components:
            lines.append(f"{facts.name}.{{0..{last}}}.{component}@{{{facts.positions}}}")
            if component.endswith("attn"):
                lines.append(f"{facts.name}.{{0..{last}}}.{component}.head{{0..{facts.heads - 1}}}@{{{facts.positions}}}")
    return lines
