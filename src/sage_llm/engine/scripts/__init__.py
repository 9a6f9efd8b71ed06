"""Standalone scripts run with the *engine environment's* Python (which has torch and transformers).

They import nothing from sage_llm; `hf_layout.py` is stdlib only and importable from both sides.
"""
