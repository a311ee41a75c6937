"""``llamafleet router``: an OpenAI-compatible proxy in front of ``llamafleet serve`` replicas
that picks a replica per request by prefix affinity and load. Never imports llama.cpp."""
