"""jamba-server: an OpenAI-compatible inference server for AI21 Jamba 1.5 models, built on vLLM."""

__version__ = "0.1.0"
