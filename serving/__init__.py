"""Serving: the backend interface, the vLLM client, the fake backend and the local CPU vLLM."""
