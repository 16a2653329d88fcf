"""resilient-mtl orchestrator: topology YAML -> plan -> deployment (sim, local, ...) -> results.

Planning and rendering never import torch; only backends that run agents do.
"""
