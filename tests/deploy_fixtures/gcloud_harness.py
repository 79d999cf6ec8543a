"""Running the deploy scripts against tests/deploy_fixtures/fake_gcloud.py, and reading the calls they made."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

FAKE_GCLOUD = Path(__file__).resolve().parent / "fake_gcloud.py"

MUTATING = {"create", "delete", "enable", "add-iam-policy-binding", "remove-iam-policy-binding",
            "set-autoscaling", "undelete", "rolling-action", "rm", "cp", "update", "add-metadata"}


class FakeGcloud:
    """A gcloud on PATH that records every call and models the cloud (fake_gcloud.py)."""

    def __init__(self, tmp_path: Path) -> None:
        self.state = tmp_path / "gcloud-state"
        self.state.mkdir()
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        stub = bin_dir / "gcloud"
        stub.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{FAKE_GCLOUD}" "$@"\n')
        stub.chmod(0o755)
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                    "FAKE_GCLOUD_STATE": str(self.state), "POLTERGUST_RETRY_SLEEP": "0"}
        for name in list(self.env):
            if name.startswith("POLTERGUST_") and name != "POLTERGUST_RETRY_SLEEP":
                del self.env[name]
        self.seen = 0

    def run(self, *command: str | Path, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
        """Run a script; returns its result and the gcloud calls it made."""
        result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=120,
                                env={**self.env, **(env or {})}, cwd=cwd, stdin=subprocess.DEVNULL)
        calls_file = self.state / "calls.jsonl"
        lines = calls_file.read_text().splitlines() if calls_file.exists() else []
        calls = [json.loads(line) for line in lines[self.seen:]]
        self.seen = len(lines)
        return result, calls

    def edit(self, change) -> None:
        """Change the modelled cloud (a function of its state dict)."""
        db = json.loads((self.state / "state.json").read_text()) if (self.state / "state.json").exists() else {
            "resources": {}, "bindings": [], "services": [], "notifications": {}, "subscriptions": {}, "next_id": 1}
        change(db)
        (self.state / "state.json").write_text(json.dumps(db))

    def add_subscription(self, name: str, topic: str) -> None:
        self.edit(lambda db: db["subscriptions"].__setitem__(name, topic))


def make_release(directory: Path, version: str = "0.1.0-0123456789ab", wheel: bytes = b"the wheel") -> Path:
    """A release.json with its files, as deploy/build-release.sh lays them out."""
    files = {"poltergust-0.1.0-py3-none-any.whl": wheel, "requirements.lock": b"luigi==3.8.1 --hash=sha256:00\n"}
    (directory / version).mkdir(parents=True)
    for name, data in files.items():
        (directory / version / name).write_bytes(data)
    digest = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    manifest = directory / "release.json"
    manifest.write_text(json.dumps({
        "version": version, "wheel": "poltergust-0.1.0-py3-none-any.whl",
        "wheel_sha256": digest["poltergust-0.1.0-py3-none-any.whl"], "lock": "requirements.lock",
        "lock_sha256": digest["requirements.lock"]}))
    return manifest


def release_attributes(manifest: Path, bucket: str) -> dict[str, str]:
    release = json.loads(manifest.read_text())
    prefix = f"gs://{bucket}/_poltergust/dist/{release['version']}/"
    return {"poltergust-wheel-url": prefix + release["wheel"], "poltergust-wheel-sha256": release["wheel_sha256"],
            "poltergust-lock-url": prefix + release["lock"], "poltergust-lock-sha256": release["lock_sha256"]}


def verb(call: list[str]) -> str:
    words = [w for w in call if not w.startswith("-")]
    return next((w for w in words if w in MUTATING | {"describe", "list", "get-iam-policy"}), "")


def mutations(calls: list[list[str]]) -> list[list[str]]:
    return [c for c in calls if verb(c) in MUTATING]


def matches(call: list[str], words: tuple[str, ...]) -> bool:
    """True if the call has these flags (--...) and, in a row, these other words."""
    flags = [w for w in words if w.startswith("--")]
    plain = [w for w in words if not w.startswith("--")]
    positional = [w for w in call if not w.startswith("-")]
    in_a_row = any(positional[i:i + len(plain)] == plain for i in range(len(positional) - len(plain) + 1))
    return in_a_row and all(f in call for f in flags)


def find(calls: list[list[str]], *words: str) -> list[str]:
    """The one call that matches these words (see matches)."""
    hits = [c for c in calls if matches(c, words)]
    assert len(hits) == 1, f"expected one call with {words}, got {hits}"
    return hits[0]


def metadata_of(call: list[str]) -> dict[str, str]:
    """The --metadata=^|^K=V|K=V... flag of a call as a dict (gcloud's ^|^ sets the separator)."""
    value = next(w for w in call if w.startswith("--metadata="))[len("--metadata="):]
    assert value.startswith("^|^"), value
    return dict(entry.split("=", 1) for entry in value[3:].split("|"))


def assert_flags(call: list[str], *flags: str) -> None:
    for flag in flags:
        assert flag in call, f"{flag} missing from {' '.join(call)}"
