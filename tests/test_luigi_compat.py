"""`poltergust.luigid` overrides private methods of luigi's scheduler: the versions allowed must have them.

setup.cfg caps luigi to the releases checked to have these methods with these
signatures (3.0 to 3.8). A new luigi that renames or reshapes one fails here,
not silently in a running luigid, and the cap is raised only with this test.
"""
from __future__ import annotations

import configparser
import inspect
from importlib.metadata import version
from pathlib import Path

import luigi.scheduler
import luigi.server

ROOT = Path(__file__).resolve().parent.parent
OVERRIDDEN = {
    "_schedulable": ["self", "task"],
    "_serialize_task": ["self", "task_id", "include_deps", "deps"],
    "get_work": ["self", "host", "assistant", "current_tasks", "worker", "kwargs"],
}


def _parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def test_the_scheduler_methods_poltergust_overrides_are_there() -> None:
    for name, parameters in OVERRIDDEN.items():
        assert _parameters(getattr(luigi.scheduler.Scheduler, name)) == parameters, name
    assert _parameters(luigi.scheduler.SimpleTaskState.get_task)[:2] == ["self", "task_id"]
    assert "scheduler" in _parameters(luigi.server.run)


def test_luigi_is_capped_to_the_checked_releases() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requirement = next(line for line in config["options"]["install_requires"].split() if line.startswith("luigi"))
    assert requirement == "luigi>=3,<3.9"
    major, minor = (int(part) for part in version("luigi").split(".")[:2])
    assert (3, 0) <= (major, minor) < (3, 9)
