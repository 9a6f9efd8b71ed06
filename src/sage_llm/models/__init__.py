"""The local Hugging Face cache: listing, pulling, removing, importing GGUF, recommendations."""
