"""Which engine `sage-llm bench` loads: by name, by port, the only ready one, or an explicit URL."""

from __future__ import annotations

from sage_llm.core.errors import EngineNotFound, SageLLMError, UsageError


def resolve(target: str | None, url: str | None, model: str | None) -> tuple[str, str, str | None, str | None]:
    """(base_url, model to request, API key or None, engine name or None)."""
    import os

    from sage_llm.engine.vllm import check_model_name

    check_model_name(model, "--model", hint="give the model name the server serves, or leave --model out for the "
                                            "engine's")

    if url:
        if target:
            raise UsageError("give an engine (NAME|PORT) or --url, not both", hint="e.g. `sage-llm bench qwen`")
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--url {url!r} is not an http(s) URL", hint="e.g. --url http://127.0.0.1:8000/v1")
        if not model:
            raise UsageError("--url needs --model (the model name the server serves)",
                             hint="see the server's /v1/models")
        return url.rstrip("/"), model, os.environ.get("OPENAI_API_KEY") or None, None
    from sage_llm import api
    from sage_llm.core.state import api_key_for
    from sage_llm.engine.targets import select

    views = api.engines()
    if target is None:
        ready = [v for v in views if v.state == "ready"]
        if len(ready) != 1:
            names = ", ".join(v.name or str(v.port) for v in ready) or "none"
            raise UsageError(f"{len(ready)} engines are ready ({names}); say which to benchmark",
                             hint="`sage-llm bench NAME` or `sage-llm bench PORT`")
        view = ready[0]
    else:
        matches = select(target, views)
        if not matches:
            raise EngineNotFound(f"no engine named or on port {target!r}", hint="see `sage-llm status`")
        view = matches[0]
    if view.state != "ready":
        raise SageLLMError(f"engine {view.name or view.port!r} is {view.state}, not ready"
                           + (f" ({view.error})" if view.error else ""),
                           hint=f"wait for it: `sage-llm status {view.name or view.port}` exits 0 once ready")
    key = api_key_for(view.record) if view.record is not None else None
    served = model or view.served_model_name or view.model
    if not served or not view.base_url:
        raise SageLLMError(f"engine {view.name!r} does not say which model it serves", hint="pass --model")
    return view.base_url, served, key, view.name
