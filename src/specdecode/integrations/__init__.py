"""Integrations with other engines (``vllm``: specdecode's drafters as vLLM proposers)."""
