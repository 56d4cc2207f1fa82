"""Site names over components that only some layers, or only the first rows, have."""

from __future__ import annotations

import pytest

from notice.errors import NoticeError
from notice.models.base import StreamFacts
from notice.patching.sites import expand_sites, site_catalogue

# a Q-Former: 3 layers, cross-attention on layers 0 and 2, at its 4 query tokens only
QFORMER = {"qformer": StreamFacts("qformer", 3, 2, 16, 32, ("layer", "self_attn", "cross_attn", "mlp"), "query token",
                                  "", layers_of={"cross_attn": (0, 2)}, rows_of={"cross_attn": 4})}
COUNTS = {"qformer": 9}  # 4 query tokens and 5 instruction tokens


def test_a_wildcard_layer_means_the_layers_that_have_the_component_and_its_rows():
    sites = expand_sites(["qformer.*.cross_attn.head*"], QFORMER, COUNTS)
    assert {s.layer for s in sites} == {0, 2} and {s.position for s in sites} == {0, 1, 2, 3}
    assert len(sites) == 2 * 2 * 4
    assert [s.position for s in expand_sites(["qformer.0.cross_attn@last"], QFORMER, COUNTS)] == [3]
    whole = expand_sites(["qformer.*.*@6"], QFORMER, COUNTS)  # an instruction token: no cross-attention there
    assert {s.component for s in whole} == {"layer", "self_attn", "mlp"} and len(whole) == 3 * 3


@pytest.mark.parametrize("site, message", [("qformer.1.cross_attn.head0@0", "cross_attn is on layers 0, 2"),
                                           ("qformer.0.cross_attn@6", "cross_attn has positions 0..3")])
def test_a_site_the_model_lacks_is_a_one_line_error(site, message):
    with pytest.raises(NoticeError, match=message):
        expand_sites([site], QFORMER, COUNTS)


def test_the_catalogue_lists_such_components_with_their_layers_and_rows():
    lines = site_catalogue(QFORMER)
    assert "qformer.{0,2}.cross_attn.head{0..1}@{0..3}" in lines
    assert "qformer.{0..2}.self_attn@{query token}" in lines
