"""`python -m sage_llm.gateway sage-llm gateway --options JSON`: what `sage-llm gateway start` runs detached (no
secret in argv: the options name the API key's variable, never the key). The words `sage-llm gateway` are only there
for the tools that find the gateway by its command line (daemon.PROCESS_TITLE); `--options JSON` alone works too."""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    from sage_llm.core.errors import SageLLMError
    from sage_llm.gateway import server
    from sage_llm.gateway.daemon import PROCESS_TITLE
    from sage_llm.gateway.options import GatewayOptions

    if tuple(argv[:2]) == PROCESS_TITLE:
        argv = argv[2:]
    if len(argv) != 2 or argv[0] != "--options":
        sys.stderr.write("usage: python -m sage_llm.gateway [sage-llm gateway] --options JSON\n")
        return 2
    try:
        opts = GatewayOptions.from_json(json.loads(argv[1]))
        sys.stdout.write(f"sage-llm gateway listening on http://{opts.host}:{opts.port}/v1 (pid "
                         f"{__import__('os').getpid()})\n")
        sys.stdout.flush()
        gw = server.serve(opts)
    except SageLLMError as exc:
        sys.stderr.write(f"Error: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else "") + "\n")
        return exc.exit_code
    for name in gw.stopped_engines:
        sys.stdout.write(f"stopped engine {name!r}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
