"""The node's settings, declared once: flags, variables, defaults, checks and the README's table all agree."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from poltergust.layout import Location
from poltergust.settings import DEFAULT_ROOT, OPTIONS, Settings, build_parser, parse_settings, readme_table

ROOT = Path(__file__).resolve().parent.parent

FLAGS = [
    "path", "node-name", "data-dir", "env-dir", "scheduler-url", "embedded-scheduler-port", "scheduler-config",
    "project", "topic", "subscription", "backlog-subscription", "backlog-ack-deadline", "backlog-max-lease",
    "env-cache-size", "share-environments", "share-environments-key-env", "max-concurrent", "rescan-interval",
    "outage-limit", "claim-grace", "start-stale-after", "log-upload-interval", "heartbeat-interval", "notify-url",
    "secret-env", "secrets-file", "pipeline-service-account", "iam-credentials-url", "allowed-environment-prefix",
    "run-as", "run-as-pool", "warm", "warm-idle-seconds", "warm-prestart", "min-free-disk", "http-host", "http-port",
    "log-level", "log-format",
]


def readme_flag_table() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^\| flag \| variable \| meaning \|\n(?:\|.*\n)*", readme, re.M)
    assert match, "README.md has no table of the node's flags (| flag | variable | meaning |)"
    return match.group(0)


def test_the_readme_table_is_the_one_the_declarations_make() -> None:
    expected = readme_table()
    assert readme_flag_table() == expected, (
        "README.md's table of node flags differs from the declarations in poltergust/settings.py; "
        f"replace it with (python -m poltergust.settings --markdown):\n\n{expected}")


def test_the_table_can_be_printed_from_the_command_line() -> None:
    printed = subprocess.run([sys.executable, "-m", "poltergust.settings", "--markdown"], capture_output=True,
                             text=True, check=True, cwd=ROOT, timeout=60)
    assert printed.stdout == readme_table()
    assert printed.stdout.count("\n") == len(OPTIONS) + 2


def test_every_flag_is_declared_once_with_its_variable() -> None:
    assert [option.flag for option in OPTIONS] == FLAGS
    help_text = build_parser({}).format_help()
    for option in OPTIONS:
        assert f"--{option.flag}" in help_text and f"[{option.variable}]" in help_text
        assert option.variable == "POLTERGUST_" + option.flag.upper().replace("-", "_")
        assert "`" not in help_text, "the README's code spans are plain text in --help"


def test_defaults_without_flags_or_variables() -> None:
    settings = parse_settings(["--path", "/srv/bucket/pipeline"], environ={})
    assert settings == Settings(
        locations=[Location("file:///srv/bucket", "pipeline/")], node_name=settings.node_name,
        data_dir=DEFAULT_ROOT / "nodes" / settings.node_name, env_dir=DEFAULT_ROOT / "environments",
        topic="poltergust-bucket")
    assert (settings.embedded_scheduler_port, settings.backlog_ack_deadline, settings.backlog_max_lease,
            settings.max_concurrent, settings.rescan_interval, settings.outage_limit, settings.claim_grace,
            settings.start_stale_after, settings.log_upload_interval, settings.heartbeat_interval,
            settings.warm_idle_seconds) == (8082, 60, 86400.0, 4, 300.0, 600.0, 60.0, 180.0, 30.0, 60.0, 600.0)
    assert (settings.warm, settings.warm_prestart, settings.share_environments) == (True, False, False)
    assert (settings.env_cache_size, settings.min_free_disk, settings.http_port, settings.http_host) \
        == (None, None, 0, "127.0.0.1")
    assert (settings.log_level, settings.log_format, settings.project, settings.scheduler_url) \
        == ("INFO", "auto", "", "")


def test_a_settings_field_default_is_its_flag_default() -> None:
    """`Settings(...)` built directly (as tests do) gets the values a node started without flags gets."""
    parsed = vars(build_parser({}).parse_args([]))
    for field in dataclasses.fields(Settings):
        if "option" not in field.metadata:
            continue  # derived, not a flag (the secrets read from --secrets-file)
        option = field.metadata["option"]
        if field.default is not dataclasses.MISSING and option.fallback is None and field.name == option.dest:
            assert parsed[option.dest] == field.default, option.flag


def test_variables_set_what_flags_set_and_flags_win() -> None:
    environ = {"POLTERGUST_PATH": "gs://b/one gs://c/two", "POLTERGUST_PROJECT": "p",
               "POLTERGUST_MAX_CONCURRENT": "7", "POLTERGUST_WARM": "no", "POLTERGUST_ENV_CACHE_SIZE": "2G",
               "POLTERGUST_SECRET_ENV": "A B", "GOOGLE_CLOUD_PROJECT": "ignored"}
    settings = parse_settings([], environ=environ)
    assert [loc.url() for loc in settings.locations] == ["gs://b/one", "gs://c/two"]
    assert (settings.project, settings.max_concurrent, settings.warm, settings.env_cache_size,
            settings.secret_env, settings.topic) == ("p", 7, False, 2 * 1024 ** 3, ["A", "B"], "poltergust-b")
    settings = parse_settings(["--path", "gs://d/x", "--max-concurrent", "2", "--warm", "--secret-env", "C"],
                              environ=environ)
    assert ([loc.url() for loc in settings.locations], settings.max_concurrent, settings.warm,
            settings.secret_env) == (["gs://d/x"], 2, True, ["C"])
    assert parse_settings(["--path", "gs://b/p"], environ={"GOOGLE_CLOUD_PROJECT": "gcp"}).project == "gcp"


def test_derived_directories_follow_the_data_dir(tmp_path: Path) -> None:
    settings = parse_settings(["--path", "/srv/b/p", "--data-dir", str(tmp_path)], environ={})
    assert (settings.data_dir, settings.env_dir) == (tmp_path, tmp_path / "environments")
    settings = parse_settings(["--path", "/srv/b/p", "--env-dir", str(tmp_path / "e")], environ={})
    assert settings.env_dir == tmp_path / "e"


@pytest.mark.parametrize(("argv", "environ", "message"), [
    ([], {}, "--path is required (or set POLTERGUST_PATH)"),
    (["--path", "s3://b/p"], {}, "s3://b/p: expected gs://BUCKET/PATH, file:///PATH or a local path"),
    (["--path", "gs://b/p", "--path", "/srv/b/p", "--project", "p"], {},
     "--path: one node watches either buckets or local directories, not both"),
    (["--path", "gs://b/p"], {},
     "--project is required for gs:// paths (or set POLTERGUST_PROJECT or GOOGLE_CLOUD_PROJECT)"),
    (["--path", "/srv/b/p", "--backlog-subscription", "bl"], {},
     "--backlog-subscription: only for gs:// paths (a local directory has no backlog)"),
    (["--path", "/srv/b/p", "--backlog-ack-deadline", "601"], {},
     "--backlog-ack-deadline: must be 10 to 600 seconds (got 601)"),
    (["--path", "/srv/b/p", "--start-stale-after", "2.5"], {},
     "--start-stale-after: must be at least 3 seconds (got 2.5)"),
    (["--path", "/srv/b/p", "--share-environments"], {},
     "--share-environments needs --share-environments-key-env NAME: the variable NAME holds the key"),
    (["--path", "/srv/b/p", "--share-environments", "--share-environments-key-env", "K"], {"K": "short"},
     "--share-environments-key-env K: the variable K is too short; it must hold a key of at least 16 characters"),
    (["--path", "/srv/b/p", "--run-as", "no-such-user-here"], {}, "--run-as no-such-user-here: no such user"),
    (["--path", "/srv/b/p", "--max-concurrent", "many"], {}, "argument --max-concurrent: invalid int value"),
    (["--path", "/srv/b/p", "--log-level", "LOUD"], {}, "argument --log-level: invalid choice: 'LOUD'"),
    (["--path", "/srv/b/p"], {"POLTERGUST_ENV_CACHE_SIZE": "lots"}, "argument --env-cache-size: invalid parse_size"),
])
def test_bad_values_are_usage_errors_naming_the_flag(argv: list[str], environ: dict[str, str], message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_settings(argv, environ=environ)
    assert exited.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_the_shared_environments_key_leaves_the_environment() -> None:
    environ = {"FLEET_KEY": "k" * 16}
    settings = parse_settings(["--path", "/srv/b/p", "--share-environments", "--share-environments-key-env",
                               "FLEET_KEY"], environ=environ)
    assert settings.share_key == b"k" * 16 and environ == {}
    assert "k" * 16 not in repr(settings)
