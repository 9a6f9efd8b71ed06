"""`python -m sage_llm` runs the `llm` command group (same as the `sage-llm` script)."""

from sage_llm.cli.main import llm_main

if __name__ == "__main__":
    llm_main()
