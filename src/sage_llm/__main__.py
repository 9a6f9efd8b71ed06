"""`python -m sage_llm` runs the same CLI as the `sage-llm` script, under the name it was invoked as."""

import sys

from sage_llm.cli.main import run

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], "python -m sage_llm"))
