"""eqz: an emotional equalizer for local LLM chat. ``eqz.load()`` gives a model with sliders (see eqz.api).

The public names load on first use, so ``import eqz`` (and the numpy modules: bank, meter, directions) stays
light: llama.cpp starts when a model is loaded.
"""

__version__ = "0.1.0"

__all__ = ["Chat", "ControlVector", "EqzError", "EqzModel", "EqzWarning", "list_banks", "list_presets", "load",
           "read_bank", "read_preset", "save_preset", "__version__"]


def __dir__() -> list[str]:
    """The public names too (they load on first use), for tab completion in a notebook."""
    return sorted({*globals(), *__all__})


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'eqz' has no attribute {name!r}")
