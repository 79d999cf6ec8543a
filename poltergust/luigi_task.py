"""The original entry point: `luigi RunTasks --module poltergust --path=gs://mybucket/pipeline`.

It runs the same node as `python -m poltergust.async_worker`, inside a luigi
task, for deployments that still start Poltergust that way.
"""
from __future__ import annotations

import luigi
import luigi.interface


class RunTasks(luigi.Task):
    path = luigi.Parameter(description="pipeline prefix to watch: gs://BUCKET/PREFIX or a local directory")
    hostname = luigi.Parameter(default="", description="this node's name (default: the node's, the host name)")

    def complete(self) -> bool:
        return False  # a node serves until it is stopped

    def run(self) -> None:
        from poltergust.async_worker import main

        argv = ["--path", self.path, *(["--node-name", self.hostname] if self.hostname else [])]
        core = luigi.interface.core()
        if core.scheduler_url:
            argv += ["--scheduler-url", core.scheduler_url]
        main(argv)
