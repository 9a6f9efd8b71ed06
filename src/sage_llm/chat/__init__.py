"""Chat sessions against a local engine or the cloud, and the streaming HTTP client they use."""
