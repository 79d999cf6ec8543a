"""luigid's configuration: the user's fragment checked, merged with the fleet's settings, and used by luigid."""
from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import LocalBucket, Node, free_port, resource_totals

from poltergust.luigid.configuration import FLEET_DEFAULTS, LuigidConfigError, luigid_config, parse_fragment
from poltergust.settings import parse_settings


def _read(text: str) -> dict[str, dict[str, str]]:
    parser = configparser.RawConfigParser()
    parser.read_string(text)
    return {section: dict(parser.items(section)) for section in parser.sections()}


def test_an_empty_fragment_gives_the_fleets_settings() -> None:
    assert _read(luigid_config("")) == FLEET_DEFAULTS
    assert FLEET_DEFAULTS["scheduler"]["worker_disconnect_delay"] == "30"


def test_the_users_settings_are_added_and_win_over_the_fleets_defaults() -> None:
    merged = _read(luigid_config("[resources]\nwarehouse = 2\n[scheduler]\nworker-disconnect-delay = 600\n"
                                 "retry_count = 3\n[task_history]\ndb_connection = sqlite:////tmp/h.db\n"))
    assert merged["resources"] == {"warehouse": "2"}
    defaults = {k: v for k, v in FLEET_DEFAULTS["scheduler"].items() if k != "worker_disconnect_delay"}
    assert merged["scheduler"] == {**defaults, "worker-disconnect-delay": "600", "retry_count": "3"}
    assert merged["task_history"] == {"db_connection": "sqlite:////tmp/h.db"}


@pytest.mark.parametrize("fragment, message", [
    ("[scheduler]\nstate_path = /tmp/x\n", "[scheduler] state_path: Poltergust sets luigid's state file itself"),
    ("[scheduler]\nretry_delay = soon\n", "[scheduler] retry_delay: 'soon' is not a valid value"),
    ("[scheduler]\nretry_dleay = 5\n", "[scheduler] retry_dleay: luigid does not know this key"),
    ("[scheduler]\nprune_on_get_work = maybe\n", "[scheduler] prune_on_get_work: 'maybe' is not a valid value"),
    ("[resources]\nwarehouse = two\n", "[resources] warehouse: a resource's amount must be a whole number"),
    ("[worker]\nkeep_alive = false\n", "[worker]: a setting of luigi's workers, not of luigid; a pipeline sets it"),
    ("[core]\nworkers = 4\n", "[core]: a setting of luigi's workers"),
    ("[sheduler]\nretry_delay = 5\n", "[sheduler]: luigid does not read this section"),
    ("[task_history]\ndb = x\n", "[task_history] db: luigid reads only db_connection"),
    ("retry_delay = 5\n", "not a luigi configuration file: File contains no section headers"),
])
def test_what_luigid_would_not_take_is_refused_by_name(fragment: str, message: str) -> None:
    with pytest.raises(LuigidConfigError) as error:
        parse_fragment(fragment)
    assert str(error.value).startswith(message), error.value


def test_task_history_is_refused_without_sqlalchemy() -> None:
    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        with pytest.raises(LuigidConfigError, match=r"^\[scheduler\] record_task_history: .* needs SQLAlchemy"):
            parse_fragment("[scheduler]\nrecord_task_history = true\n")
    else:
        parse_fragment("[scheduler]\nrecord_task_history = true\n")


def test_the_command_line_merges_or_names_the_key(tmp_path: Path) -> None:
    fragment = tmp_path / "luigid.cfg"
    fragment.write_text("[resources]\nwarehouse = 2\n")
    out = tmp_path / "merged.cfg"
    command = [sys.executable, "-m", "poltergust.luigid.configuration"]
    subprocess.run([*command, "merge", str(fragment), "--out", str(out)], check=True)
    assert _read(out.read_text())["resources"] == {"warehouse": "2"}
    fragment.write_text("[scheduler]\nstate_path = /x\n")
    checked = subprocess.run([*command, "check", str(fragment)], capture_output=True, text=True)
    assert checked.returncode == 2
    assert checked.stderr.startswith(f"{fragment}: [scheduler] state_path: ")


def test_scheduler_config_is_refused_at_start_naming_the_key(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.cfg"
    bad.write_text("[scheduler]\nstate_path = /x\n")
    with pytest.raises(SystemExit):
        parse_settings(["--path", str(tmp_path / "p"), "--scheduler-config", str(bad)])
    assert f"--scheduler-config {bad}: [scheduler] state_path: " in capsys.readouterr().err
    good = tmp_path / "good.cfg"
    good.write_text("[resources]\nwarehouse = 2\n")
    with pytest.raises(SystemExit):
        parse_settings(["--path", str(tmp_path / "p"), "--scheduler-config", str(good),
                        "--scheduler-url", "http://127.0.0.1:1"])
    assert "--scheduler-config: only for the local luigid" in capsys.readouterr().err


def test_the_embedded_luigid_runs_with_the_nodes_scheduler_config(tmp_path: Path) -> None:
    config = tmp_path / "luigid.cfg"
    config.write_text("[resources]\nwarehouse = 2\n[scheduler]\nretry_count = 3\n")
    port = free_port()
    bucket = LocalBucket(tmp_path / "bucket")
    node = Node("embedded", tmp_path, ["--path", bucket.url("pipeline"), "--data-dir", str(tmp_path / "data"),
                                       "--embedded-scheduler-port", str(port), "--scheduler-config", str(config)],
                dict(os.environ))
    try:
        node.wait_ready()
        assert resource_totals(f"http://127.0.0.1:{port}") == {"warehouse": 2}
        written = _read((tmp_path / "data" / "luigid" / "luigi.cfg").read_text())
        assert written["scheduler"]["retry_count"] == "3"
        assert written["scheduler"]["worker_disconnect_delay"] == FLEET_DEFAULTS["scheduler"][
            "worker_disconnect_delay"]
    finally:
        node.stop()
