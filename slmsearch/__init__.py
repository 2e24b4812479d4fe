"""slmsearch: hardware-aware compression search for small LLaMA-family language models."""

__version__ = "0.1.0"
