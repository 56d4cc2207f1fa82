"""Model adapters, one file per family, and the one way to load them.

A new family is one adapter file (a subclass of `ModelAdapter`, models/base.py), one line in
FAMILIES, and a tiny builder for the contract suite (tests/models/families.py).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import json
import re
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import torch

from notice.errors import NoticeError
from notice.models.base import ModelAdapter

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED = {"easyvqa-blip": ASSETS / "easyvqa-blip", "easyvqa-llava": ASSETS / "easyvqa-llava",
            "easyvqa-mllama": ASSETS / "easyvqa-mllama"}
DEFAULT_MODEL = "easyvqa-blip"


# config.json's model_type → "module:AdapterClass"
FAMILIES = {
    "blip": "notice.models.blip:BlipAdapter",
    "llava": "notice.models.llava:LlavaAdapter",
    "blip-2": "notice.models.qformer:Blip2Adapter",
    "instructblip": "notice.models.qformer:InstructBlipAdapter",
    "mllama": "notice.models.mllama:MllamaAdapter",
    "qwen2_vl": "notice.models.qwen2_vl:Qwen2VLAdapter",
    "qwen2_5_vl": "notice.models.qwen2_vl:Qwen25VLAdapter",
    "gemma3": "notice.models.gemma3:Gemma3Adapter",
    "llava_next": "notice.models.llava_next:LlavaNextAdapter",
    "llava_onevision": "notice.models.llava_onevision:LlavaOnevisionAdapter",
}


def adapter_class(model_type: str, architecture: str = "") -> type[ModelAdapter]:
    """The adapter of a checkpoint's model_type; `architecture` (its class) names it in the error."""
    if model_type not in FAMILIES:
        what = f"{architecture} (model type {model_type!r})" if architecture else f"model type {model_type!r}"
        raise NoticeError(f"{what} is not supported: notice reads {', '.join(sorted(FAMILIES))} checkpoints; pass "
                          "one of those, or add an adapter for it (README: Model families and the adapter contract)")
    module, name = FAMILIES[model_type].split(":")
    return getattr(importlib.import_module(module), name)


def _model_type(source: str) -> tuple[str, str]:
    """(model_type, first architecture) of a resolved source: a folder's config.json, or the hub's."""
    folder = Path(source)
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise NoticeError(f"{folder} has no config.json: point --model at a folder written by save_pretrained")
        config = json.loads(config_file.read_text())
        return config.get("model_type", ""), (config.get("architectures") or [""])[0]
    from transformers import AutoConfig

    try:
        found = AutoConfig.from_pretrained(source)
        return found.model_type, (getattr(found, "architectures", None) or [""])[0]
    except Exception as error:  # unknown id, gated repository, malformed config: all mean the same to a user
        raise NoticeError(f"cannot load model {source!r}: the hub did not serve it ({error.__class__.__name__}); "
                          f"check the id; {_choices(source)}, or pass a folder written by save_pretrained") from error


def _choices(name: str) -> str:
    """The embedded names, the closest first when `name` looks like a typo of one."""
    close = difflib.get_close_matches(name, list(EMBEDDED), n=1)
    return (f"did you mean {close[0]}? " if close else "") + f"the embedded models are {', '.join(EMBEDDED)}"


HUB_TIMEOUT_S = 3.0  # a reachable hub answers a TCP connect well within this
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve_model(name: str) -> str:
    """The folder or hub id behind a model name: an embedded name, a local folder, or a hub id that the
    local cache holds or the hub can serve. Anything else is a one-line error within seconds."""
    if name in EMBEDDED:
        if not EMBEDDED[name].is_dir():
            raise NoticeError(f"embedded model {name!r} is missing from {EMBEDDED[name]}; reinstall notice or run "
                              "`notice train-default`")
        return str(EMBEDDED[name])
    folder = Path(name).expanduser()
    if folder.is_dir():
        return str(folder)
    choices = _choices(name)
    if folder.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or not _HUB_ID.fullmatch(name):
        raise NoticeError(f"model {name!r} is not a folder written by save_pretrained nor a hub id; {choices}")
    if hub_reachable():
        return name
    cached = _cached_snapshot(name)  # downloaded before: read it without asking the hub
    if cached is None:
        raise NoticeError(f"model {name!r} is not an embedded name nor a local folder, and the hub cannot be "
                          f"reached to fetch it ({_hub_address()}); {choices}, or pass a folder written by "
                          "save_pretrained")
    return cached


def _cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot folder of a hub id that was downloaded before, or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # a malformed id for the cache's rules
        return None
    return str(Path(found).parent) if isinstance(found, str) else None


def _hub_address() -> str:
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else constants.ENDPOINT


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub (or the HTTPS proxy in use) opens within `timeout` seconds;
    False at once under HF_HUB_OFFLINE. The probe runs in a thread so that a slow DNS cannot stall it."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlsplit(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        endpoint = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address = (endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80))
    opened: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


@dataclass(frozen=True)
class PromptBudget:
    """The most positions a model reads, and how many a question's prompt takes in it."""

    model: str
    limit: int
    length: Callable[[str], int]

    @classmethod
    def of(cls, adapter) -> "PromptBudget":
        """The budget of a loaded model (lengths measured once per prompt)."""
        return cls(adapter.name, adapter.max_prompt_tokens, functools.lru_cache(maxsize=None)(adapter.token_length))

    def excess(self, question: str) -> int | None:
        """The prompt's length when it exceeds the limit, else None."""
        length = self.length(question)
        return length if length > self.limit else None

    def describe(self, question: str, length: int) -> str:
        return f"the prompt {question!r} is {length} tokens, more than the {self.limit} that {self.model} reads"


def prompt_budget(name: str) -> PromptBudget:
    """The prompt budget of a model from its config and processor, without loading its weights
    (`notice pairs` checks every pair against it)."""
    source = resolve_model(name)
    limit, length = adapter_class(*_model_type(source)).prompt_budget(source)
    return PromptBudget(name, limit, functools.lru_cache(maxsize=None)(length))


def load_model(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: str | torch.dtype = "float32",
               load_in_4bit: bool = False) -> ModelAdapter:
    """An adapter for an embedded model name, a local folder or a hub id (e.g. Salesforce/blip-vqa-base,
    llava-hf/llava-1.5-7b-hf); `load_in_4bit` (LLaVA only) needs the optional bitsandbytes."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars speak for long work
    source = resolve_model(name)
    family = adapter_class(*_model_type(source))
    extra = {}
    if load_in_4bit:
        if family.family != "llava":
            raise NoticeError(f"4-bit loading is offered for LLaVA models only, not {name!r}: drop --4bit")
        extra["load_in_4bit"] = True
    try:
        return family.from_pretrained(source, device=device, dtype=dtype, name=name, **extra)
    except NoticeError:
        raise
    except (OSError, ValueError) as error:
        raise NoticeError(f"cannot load model {name!r}: {error.__class__.__name__}: {str(error).splitlines()[0]}") from error


def load_tokenizer(model: str):
    """The fast tokenizer of an embedded model name, a saved folder or a hub id (offsets are needed)."""
    from transformers import AutoTokenizer

    source = resolve_model(model)  # a one-line error within seconds for an unknown name or an unreachable hub
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:  # unknown hub id, folder without tokenizer files
        raise NoticeError(f"cannot load the tokenizer of {model!r} ({error.__class__.__name__}); "
                          "pass --model with a folder written by save_pretrained or a reachable hub id") from error
    if not getattr(tokenizer, "is_fast", False):
        raise NoticeError(f"the tokenizer of {model!r} is not a fast tokenizer; STR needs token offsets")
    return tokenizer
