"""Model adapters, one file per family, and the one way to load them.

A new family is one adapter file (a subclass of `ModelAdapter`, models/base.py), one line in
FAMILIES, and a tiny builder for the contract suite (tests/models/families.py).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from notice.errors import NoticeError
from notice.models.base import ModelAdapter

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED = {"easyvqa-blip": ASSETS / "easyvqa-blip", "easyvqa-llava": ASSETS / "easyvqa-llava"}
DEFAULT_MODEL = "easyvqa-blip"

# config.json's model_type → "module:AdapterClass"
FAMILIES = {
    "blip": "notice.models.blip:BlipAdapter",
    "llava": "notice.models.llava:LlavaAdapter",
}


def adapter_class(model_type: str) -> type[ModelAdapter]:
    if model_type not in FAMILIES:
        raise NoticeError(f"model type {model_type!r} is not supported: notice knows {', '.join(sorted(FAMILIES))}")
    module, name = FAMILIES[model_type].split(":")
    return getattr(importlib.import_module(module), name)


def model_source(name: str) -> str:
    """The folder of an embedded model, else the name itself (a folder or a hub id)."""
    source = EMBEDDED.get(name)
    if source is None:
        return name
    if not source.is_dir():
        raise NoticeError(f"embedded model {name!r} is missing from {source}; reinstall notice or run `notice train-default`")
    return str(source)


def model_config(name: str) -> dict:
    """config.json of an embedded model, a saved folder or a hub id, without loading weights."""
    source = model_source(name)
    folder = Path(source)
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise NoticeError(f"{folder} has no config.json: point --model at a folder written by save_pretrained")
        return json.loads(config_file.read_text())
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source).to_dict()
    except Exception as error:  # offline hub, unknown id, malformed config: all mean the same to a user
        raise NoticeError(
            f"cannot load model {source!r}: it is not an embedded model ({', '.join(EMBEDDED)}), not a local "
            f"folder, and the hub did not serve it ({error.__class__.__name__}); check the name or download it "
            "and pass the folder") from error


def load_model(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: str | torch.dtype = "float32",
               load_in_4bit: bool = False) -> ModelAdapter:
    """An adapter for an embedded model name, a local folder or a hub id (e.g. Salesforce/blip-vqa-base,
    llava-hf/llava-1.5-7b-hf); `load_in_4bit` (LLaVA only) needs the optional bitsandbytes."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars speak for long work
    family = adapter_class(model_config(name).get("model_type", ""))
    options = {}
    if load_in_4bit:
        if family.family != "llava":
            raise NoticeError(f"4-bit loading is offered for LLaVA models only, not {name!r}: drop --4bit")
        options["load_in_4bit"] = True
    try:
        return family.from_pretrained(model_source(name), device=device, dtype=dtype, name=name, **options)
    except NoticeError:
        raise
    except (OSError, ValueError) as error:
        raise NoticeError(f"cannot load model {name!r}: {error.__class__.__name__}: {str(error).splitlines()[0]}") from error


def load_tokenizer(name: str):
    """The fast tokenizer of an embedded model name, a saved folder or a hub id (offsets are needed)."""
    from transformers import AutoTokenizer

    source = model_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:  # offline hub, unknown id, folder without tokenizer files
        raise NoticeError(f"cannot load the tokenizer of {name!r} ({error.__class__.__name__}); "
                          "pass --model with a folder written by save_pretrained or a reachable hub id") from error
    if not getattr(tokenizer, "is_fast", False):
        raise NoticeError(f"the tokenizer of {name!r} is not a fast tokenizer; STR needs token offsets")
    return tokenizer
