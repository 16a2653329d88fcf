"""Tasks: a model, the agent's own data stream, its loss and metrics. Pure (no grpc import)."""

from mtl_node.tasks import target_localization as _tl  # noqa: F401  (registers the task)
from mtl_node.tasks.base import TASKS, Metrics, Task, TaskContext, make_task

__all__ = ["TASKS", "Metrics", "Task", "TaskContext", "make_task"]
