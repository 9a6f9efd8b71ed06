"""One module per `sage-llm` command."""
