"""Tasks: a model, the agent's own data stream, its loss and metrics. Pure (no grpc import)."""

from mtl_node.tasks import digits as _digits  # noqa: F401  (registers the task)
from mtl_node.tasks import har as _har  # noqa: F401  (registers the task)
from mtl_node.tasks import target_localization as _tl  # noqa: F401  (registers the task)
from mtl_node.tasks.base import TASKS, Metrics, Task, TaskContext, make_task
from mtl_node.tasks.plugin import TaskDefinition
from mtl_node.tasks.torch_task import TorchTask, TorchTaskParams

__all__ = [
    "TASKS",
    "Metrics",
    "Task",
    "TaskContext",
    "TaskDefinition",
    "TorchTask",
    "TorchTaskParams",
    "make_task",
]
