"""Model adapters, one per family, and the one way to load them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from notice.errors import NoticeError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED = {"easyvqa-blip": ASSETS / "easyvqa-blip", "easyvqa-llava": ASSETS / "easyvqa-llava"}
DEFAULT_MODEL = "easyvqa-blip"


def _adapter_class(model_type: str):
    if model_type == "blip":
        from notice.models.blip import BlipAdapter

        return BlipAdapter
    if model_type == "llava":
        from notice.models.llava import LlavaAdapter

        return LlavaAdapter
    raise NoticeError(f"model type {model_type!r} is not supported: notice knows blip and llava")


def _model_type(source: str) -> str:
    folder = Path(source)
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise NoticeError(f"{folder} has no config.json: point --model at a folder written by save_pretrained")
        return json.loads(config_file.read_text()).get("model_type", "")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source).model_type
    except Exception as error:  # offline hub, unknown id, malformed config: all mean the same to a user
        raise NoticeError(
            f"cannot load model {source!r}: it is not an embedded model ({', '.join(EMBEDDED)}), not a local "
            f"folder, and the hub did not serve it ({error.__class__.__name__}); check the name or download it "
            "and pass the folder") from error


def load_model(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: str | torch.dtype = "float32",
               load_in_4bit: bool = False):
    """An adapter for an embedded model name, a local folder or a hub id (e.g. Salesforce/blip-vqa-base,
    llava-hf/llava-1.5-7b-hf); `load_in_4bit` (LLaVA only) needs the optional bitsandbytes."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars speak for long work
    source = str(EMBEDDED.get(name, name))
    if name in EMBEDDED and not Path(source).is_dir():
        raise NoticeError(f"embedded model {name!r} is missing from {source}; reinstall notice or run `notice train-default`")
    adapter_class = _adapter_class(_model_type(source))
    extra = {}
    if load_in_4bit:
        if adapter_class.family != "llava":
            raise NoticeError(f"4-bit loading is offered for LLaVA models only, not {name!r}: drop --4bit")
        extra["load_in_4bit"] = True
    try:
        return adapter_class.from_pretrained(source, device=device, dtype=dtype, name=name, **extra)
    except NoticeError:
        raise
    except (OSError, ValueError) as error:
        raise NoticeError(f"cannot load model {name!r}: {error.__class__.__name__}: {str(error).splitlines()[0]}") from error
