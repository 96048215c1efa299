"""raygpt: train GPT-2-class language models from scratch on Ray, and judge them."""

__version__ = "0.1.0"
