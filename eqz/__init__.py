"""eqz: an emotional equalizer for local LLM chat."""

__version__ = "0.1.0"
