"""Shared fixtures: small real checkpoints built and saved by the tests themselves."""

from __future__ import annotations

import pytest
import torch

import helpers

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory):
    """A tiny random-init BLIP VQA checkpoint with the real bert-base-uncased tokenizer."""
    return helpers.save_blip(tmp_path_factory.mktemp("tiny-blip"), helpers.TINY_BLIP)


@pytest.fixture(scope="session")
def tiny_blip(tiny_blip_dir):
    from notice.models import load_model

    return load_model(str(tiny_blip_dir))


@pytest.fixture(scope="session")
def default_blip():
    from notice.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A tiny random-init LLaVA (CLIP tower, Llama with grouped-query attention, BPE tokenizer built here)."""
    return helpers.save_llava(tmp_path_factory.mktemp("tiny-llava"), helpers.TINY_LLAVA)


@pytest.fixture(scope="session")
def tiny_llava(tiny_llava_dir):
    from notice.models import load_model

    return load_model(str(tiny_llava_dir))


@pytest.fixture(scope="session")
def tiny_mllama(tmp_path_factory):
    """A tiny random-init Llama-3.2-Vision: cross-attention on language-model layers 1 and 2 only."""
    from notice.models import load_model

    return load_model(str(helpers.save_mllama(tmp_path_factory.mktemp("tiny-mllama"), instruct=False)))
