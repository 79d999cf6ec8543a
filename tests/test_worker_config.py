"""A pipeline's own luigi settings (`luigi:` in its config, or a luigi.cfg named by LUIGI_CONFIG_PATH)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness import result, submit

from poltergust.config import ConfigError, parse_pipeline
from poltergust.run.worker_config import LuigiSettingError, write_run_config

SOURCE = "gs://b/pipeline/p.config.yaml"
BASE = "environment: e.yaml\ntask: {name: T, module: m}\n"


def test_the_luigi_mapping_is_parsed_into_strings() -> None:
    config = parse_pipeline((BASE + "luigi: {core: {workers: 3, parallel-scheduling: true}, "
                                    "examples.Task: {x: 1.5}}\n").encode(), SOURCE)
    assert config.luigi == {"core": {"workers": "3", "parallel-scheduling": "true"}, "examples.Task": {"x": "1.5"}}
    assert parse_pipeline(BASE.encode(), SOURCE).luigi == {}


@pytest.mark.parametrize("luigi, key, problem", [
    ("{worker: {keep_alive: false}}", "luigi.worker.keep_alive", "the node keeps its worker asking for work"),
    ("{worker: {wait-interval: 5}}", "luigi.worker.wait-interval", "the node keeps its worker asking for work"),
    ("{worker: {id: me}}", "luigi.worker.id", "the node names its worker poltergust:PIPELINE:NODE"),
    ("{core: {no_lock: false}}", "luigi.core.no_lock", "the node runs luigi with --no-lock"),
    ("{core: {default-scheduler-url: 'http://x'}}", "luigi.core.default-scheduler-url", "the node points luigi"),
    ("{core: {local_scheduler: true}}", "luigi.core.local_scheduler", "the node points luigi"),
    ("{retcode: {task_failed: 0}}", "luigi.retcode", "the node sets luigi's exit codes"),
    ("{scheduler: {retry_count: 3}}", "luigi.scheduler", "a setting of luigid"),
    ("{resources: {acc_db: 1}}", "luigi.resources", "a setting of luigid"),
    ("[workers]", "luigi", "must be a mapping of luigi sections"),
    ("{core: 3}", "luigi.core", "must be a mapping of key: value"),
    ("{core: {workers: [3]}}", "luigi.core.workers", "must be a plain value on one line"),
    ("{core: {workers: \"3\\nx\"}}", "luigi.core.workers", "must be a plain value on one line"),
    ("{'co]re': {workers: 3}}", "luigi.co]re", "not a luigi section name"),
])
def test_what_the_node_sets_itself_is_refused_naming_the_key(luigi: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_pipeline((BASE + f"luigi: {luigi}\n").encode(), SOURCE)
    assert str(error.value).startswith(f"{SOURCE}: {key}: {problem}"), error.value


def test_the_run_config_is_the_shipped_file_with_the_mapping_over_it(tmp_path: Path) -> None:
    shipped = tmp_path / "shipped.cfg"
    shipped.write_text("[core]\nworkers = 1\nparallel-scheduling = true\n[Report]\nsetting = shipped\n")
    env = {"LUIGI_CONFIG_PATH": str(shipped)}
    write_run_config(tmp_path, {"core": {"workers": "3", "parallel_scheduling": "false"}}, env)
    assert env["LUIGI_CONFIG_PATH"] == str(tmp_path / "luigi.cfg")
    text = (tmp_path / "luigi.cfg").read_text()
    # One spelling of each key (luigi would read parallel_scheduling first); keys stay as spelt, since luigi
    # reads some (such as [core] rpc-retry-wait) only that way.
    assert "[core]\nworkers = 3\nparallel_scheduling = false\n\n[Report]\nsetting = shipped\n" in text
    # Without anything to say, the file is still written: a kept working directory never passes on settings.
    env = {}
    write_run_config(tmp_path, {}, env)
    assert "[core]" not in (tmp_path / "luigi.cfg").read_text() and env["LUIGI_CONFIG_PATH"]


def test_a_shipped_file_with_a_key_the_node_sets_is_refused(tmp_path: Path) -> None:
    shipped = tmp_path / "shipped.cfg"
    shipped.write_text("[worker]\nkeep-alive = false\n")
    with pytest.raises(LuigiSettingError, match=rf"^LUIGI_CONFIG_PATH: {shipped}: worker.keep-alive: the node"):
        write_run_config(tmp_path, {}, {"LUIGI_CONFIG_PATH": str(shipped)})
    with pytest.raises(LuigiSettingError, match=r"^LUIGI_CONFIG_PATH: cannot read .*missing.cfg"):
        write_run_config(tmp_path, {}, {"LUIGI_CONFIG_PATH": str(tmp_path / "missing.cfg")})


@pytest.mark.parametrize("backend", ["local"], indirect=True)
@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
def test_a_pipelines_settings_reach_its_luigi_warm_or_cold(
    start_node, bucket, environment_yaml: str, tmp_path: Path, warm: bool,
) -> None:
    """The mapping wins over the shipped file on a key both set; the shipped file's other keys still count."""
    start_node("node-a")
    shipped = tmp_path / "shipped.cfg"
    shipped.write_text("[Report]\nsetting = shipped\nvariable = SHIPPED_VARIABLE\n")
    out = tmp_path / "out"
    submit(bucket, "settings", {"name": "Report", "module": "poltergust_testpipes", "out-dir": str(out)},
           environment_yaml, {"LUIGI_CONFIG_PATH": str(shipped), "SHIPPED_VARIABLE": "read"},
           warm=warm, luigi={"Report": {"setting": "from the mapping"}})
    result(bucket, "settings", "done")
    report = json.loads((out / "report.json").read_text())
    assert report["setting"] == "from the mapping" and report["value"] == "read"
    # The next run of the same pipeline (the same working directory) without either: luigi's defaults again.
    bucket.delete("pipeline/settings.done.yaml")
    out2 = tmp_path / "out2"
    submit(bucket, "settings", {"name": "Report", "module": "poltergust_testpipes", "out-dir": str(out2)},
           environment_yaml, warm=warm)
    result(bucket, "settings", "done")
    assert json.loads((out2 / "report.json").read_text())["setting"] == ""


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_a_pipeline_setting_the_nodes_keys_ends_as_an_error_naming_the_key(
    start_node, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    start_node("node-a")
    submit(bucket, "owned", {"name": "Touch", "module": "poltergust_testpipes", "out-dir": str(tmp_path / "o")},
           environment_yaml, luigi={"worker": {"keep_alive": False}})
    reason = result(bucket, "owned", "error")["poltergust"]["reason"]
    assert reason.startswith(f"{bucket.url('pipeline/owned.config.yaml')}: luigi.worker.keep_alive: the node keeps")
    assert not (tmp_path / "o").exists()
