"""switchyard: serve fine-tuned LLMs as adapters or merged checkpoints, and switch between them."""

__version__ = "0.1.0"
