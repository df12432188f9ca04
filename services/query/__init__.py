"""query: the synchronous door to the mesh (FastAPI on uvicorn).

Sync predictions share the scorer's code (registry folding, hot-loading, validation,
vectorisation, canary routing) and are published to ``predictions`` with ``source=sync``;
lookups read the Redis query store; model commands go to the registry like the CLI's.
"""
