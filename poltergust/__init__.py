"""Poltergust: run Luigi pipelines on a fleet of worker nodes, triggered by YAML files in a bucket.

The package also registers `RunTasks` when luigi imports it, so that the
original entry point, `luigi RunTasks --module poltergust --path=...`, keeps
working; anything else importing the package does not pay for importing luigi.
"""
import sys

if "luigi" in sys.modules:
    from poltergust.luigi_task import RunTasks

    __all__ = ["RunTasks"]
