"""sage-llm: run and watch local vLLM inference engines."""

__version__ = "0.1.0"
