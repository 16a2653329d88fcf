"""The torch-free core: what the orchestrator, spec validation, ``render`` and ``certs`` share with
the agents without importing torch or grpc.

- ``errors``: the exception tree (``ConfigError`` = one clear line, exit 2).
- ``ids``: the agent id pattern.
- ``protocol``: wire constants (service name, agent port, chunk and message sizes).
- ``names``: every built-in task, rule and attack by name, with its one-line description; the
  registries that hold the implementations take their descriptions from here.
- ``registry``: the name -> factory registry each family uses.

import-linter (pyproject.toml) checks that nothing here imports torch or grpc.
"""
