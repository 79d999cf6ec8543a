"""Poltergust: run Luigi pipelines on a fleet of worker nodes, triggered by YAML files in a bucket.

The package also registers `RunTasks` so that the original entry point,
`luigi RunTasks --module poltergust --path=...`, keeps working.
"""
from .luigi_task import RunTasks

__all__ = ["RunTasks"]
