"""What an engine the gateway starts inherits from the gateway's environment.

The gateway runs with the user's whole shell environment: its own client key (--api-key-env), the cloud key it falls
back to, other services' secrets, proxy settings, and possibly vLLM switches meant for something else. An engine is a
separate server with its own attack surface (a request can make vLLM fetch URLs, its logs hold its environment's
effects), so it gets only what it needs:

* no secrets: the gateway's key variable, cloud keys (SAGE_CHAT_API_KEY, OPENAI_API_KEY, ...), and any variable
  whose name ends in KEY, TOKEN, SECRET or PASSWORD, except Hugging Face's (HF_TOKEN: gated downloads);
* no vLLM switch that opens an engine up: VLLM_SERVER_DEV_MODE (dev routes: sleep, collective_rpc, ... unguarded by
  the key), runtime LoRA loading, insecure serialisation, response logging; the gateway sets dev mode itself, on the
  engines it puts to sleep, and only there;
* no proxy credentials, and loopback is never sent through a proxy (NO_PROXY gets 127.0.0.1, localhost, ::1).

`overrides()` returns the changes as `engine_env` for `sage_llm.api` (a None value removes the variable).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

UNSAFE_VLLM = frozenset({
    "VLLM_SERVER_DEV_MODE", "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_INSECURE_SERIALIZATION",
    "VLLM_DEBUG_LOG_API_SERVER_RESPONSE", "VLLM_API_KEY", "VLLM_PORT",
})
CLOUD_KEYS = frozenset({"SAGE_CHAT_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "AZURE_OPENAI_API_KEY"})
KEEP = frozenset({"HUGGING_FACE_HUB_TOKEN"})  # and every HF_* (HF_TOKEN: gated downloads)
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_SECRET_NAME = re.compile(r"(^|_)(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)$", re.IGNORECASE)
ENGINE_KEY_PREFIX = "SAGE_LLM_GW_KEY_"  # another engine's key (never in the gateway's environment, by design)

_gateway_vars: set[str] = set()  # variables the running gateway reads its own secrets from (--api-key-env)


def keep_from_engines(*names: str | None) -> None:
    """Names of variables that hold this gateway's own secrets: no engine it starts inherits them."""
    _gateway_vars.update(n for n in names if n)


def dropped(environ: Mapping[str, str]) -> list[str]:
    """The variables of `environ` an engine started by the gateway must not inherit."""
    out = []
    for name, value in environ.items():
        if name in KEEP or name.startswith("HF_"):
            continue
        if (name in _gateway_vars or name in CLOUD_KEYS or name in UNSAFE_VLLM or _SECRET_NAME.search(name)
                or name.startswith(("SAGE_LLM_GATEWAY_", ENGINE_KEY_PREFIX))):
            out.append(name)
        elif name in PROXY_VARS and "@" in (urlsplit(value).netloc or ""):
            out.append(name)  # a proxy URL with a user and password in it
    return sorted(out)


def overrides(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """`engine_env` for an engine the gateway starts: None removes an inherited variable."""
    environ = os.environ if environ is None else environ
    out: dict[str, str | None] = dict.fromkeys(dropped(environ))
    for name in ("NO_PROXY", "no_proxy"):
        have = [h.strip() for h in environ.get(name, "").split(",") if h.strip()]
        out[name] = ",".join(have + [h for h in LOOPBACK if h not in have])
    return out
