"""Load generation and benchmark targets for `sage-llm bench`."""
