"""``python -m orchestrator.cli``: how ``up --detach`` starts its background run."""

from orchestrator.cli import main

main()
