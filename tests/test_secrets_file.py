"""`--secrets-file`: secrets read at start (the deploy's systemd credential), never in the node's environment.

A value there is usable as `{{NAME}}` in environment files, never reaches a
pipeline, is masked in logs and results, and is not in `/proc/NODE/environ`,
where a process of the node's user could read the node's initial environment.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from harness import result, submit

from poltergust.settings import parse_settings

VALUE = "file-secret-value-3"


def test_a_secrets_file_is_read_and_every_name_in_it_is_a_secret(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.write_text(f"# from Secret Manager\nPLAIN_NAME={VALUE}\nSHARE_KEY=k" + "e" * 20 + "\n\n")
    settings = parse_settings(["--path", str(tmp_path / "p"), "--secrets-file", str(secrets), "--secret-env", "X",
                               "--share-environments", "--share-environments-key-env", "SHARE_KEY"])
    assert settings.file_secrets == {"PLAIN_NAME": VALUE, "SHARE_KEY": "k" + "e" * 20}
    assert settings.secret_env == ["X", "PLAIN_NAME", "SHARE_KEY"] and settings.share_key == b"k" + b"e" * 20
    assert VALUE not in repr(settings)


def test_a_bad_secrets_file_line_is_named_without_its_value(tmp_path: Path, capsys) -> None:
    secrets = tmp_path / "secrets"
    secrets.write_text(f"GOOD=1\n{VALUE}\n")
    with pytest.raises(SystemExit):
        parse_settings(["--path", str(tmp_path / "p"), "--secrets-file", str(secrets)])
    error = capsys.readouterr().err
    assert "line 2 is not NAME=VALUE" in error and VALUE not in error


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_file_secrets_serve_references_and_reach_no_pipeline_nor_the_node_environment(
    start_node, bucket, environment_yaml: str, tmp_path: Path,
) -> None:
    secrets = tmp_path / "node-secrets"
    secrets.write_text(f"PLAIN_NAME={VALUE}\n")
    secrets.chmod(0o600)
    leak = tmp_path / "fetched.txt"
    leak.write_text(VALUE)
    (tmp_path / VALUE).mkdir()  # an empty --find-links directory named by the secret: the reference resolves
    node = start_node("node-a", "--secrets-file", str(secrets))
    referencing = environment_yaml + f"  - --find-links {tmp_path}/{{{{PLAIN_NAME}}}}\n"
    submit(bucket, "dump", {"name": "Dump", "module": "poltergust_testpipes", "out-dir": str(tmp_path / "d"),
                            "leak": str(leak)}, referencing)
    error = result(bucket, "dump", "error")
    log = bucket.read(bucket.log_name("dump", "node-a")).decode()
    assert "dumped the environment" in log, "the environment was built with the reference resolved, and ran"
    assert "env PLAIN_NAME=" not in log and "leaked **** and ****" in log
    assert VALUE not in log and VALUE not in yaml.safe_dump(error)
    assert VALUE.encode() not in Path(f"/proc/{node.process.pid}/environ").read_bytes()
