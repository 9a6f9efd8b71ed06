"""`sage-llm gateway`: one long-lived OpenAI-compatible endpoint in front of the local vLLM engines.

Layout (only `engines.py` starts, stops or inspects engines; only `server.py` and `proxy` code import aiohttp):
  options.py   GatewayOptions and model profiles ([gateway] / [gateway.models."ORG/NAME"] in the config file)
  engines.py   the one door to the engine library (start, stop, inspect, cached models, sleep/wake)
  router.py    model -> engine: on-demand loads, one lifecycle lock per model, LRU eviction, idle TTL
  security.py  Host / Origin / Content-Type / API-key checks
  events.py    the Server-Sent Events bus (/api/events)
  metrics.py   Prometheus text (/metrics)
  server.py    the aiohttp application: routes and the streaming proxy
  daemon.py    `gateway start | stop | status`: the detached gateway and its record (no aiohttp)

The default port is 8901: SAGE Studio probes GET /health then GET /v1/models on SAGE_LLM_PORT (default 8901), so it
finds the gateway with no configuration.
"""

DEFAULT_PORT = 8901
DEFAULT_ENGINE_PORT = 8902  # engines the gateway starts take the first free port from here (SAGE's port table)
