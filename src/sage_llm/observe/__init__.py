"""Watching engines: HTTP probes, /metrics, logs, load stages, failure diagnosis, NVML, `top`'s data."""
