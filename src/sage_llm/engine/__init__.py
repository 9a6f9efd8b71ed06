"""Engine side: environments, the vLLM launch command, processes, and the start/stop/status use cases."""
