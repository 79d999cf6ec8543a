"""Which of the node's variables are secrets: kept out of pipelines' environments, masked wherever text goes.

A pipeline runs with the node's environment (so `PATH`, proxies and cloud
settings reach it), minus its secrets: every variable named by
`--secret-env`, every variable an environment file references as
`{{NAME}}`, the node's own settings (`POLTERGUST_*`, `DB_URL`), and any name
that says it is a credential (TOKEN, SECRET, PASSWORD, ...). Installers
building environments see the same, plus their own `PIP_*`/`UV_*` settings.
The values of
all of them are masked in every run log and result file, in every form a
program is likely to print them (see `masking`).
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

from poltergust.masking import MIN_LENGTH

CREDENTIAL_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|API_KEY|ACCESS_KEY|AUTH",
                             re.IGNORECASE)
NODE_SETTINGS = re.compile(r"POLTERGUST_.*|DB_URL")
"""The node's own configuration (a notification URL may carry a password): never a pipeline's business."""
INSTALLER_SETTINGS = re.compile(r"PIP_|UV_")


class SecretEnv:
    def __init__(self, environ: Mapping[str, str], names: Iterable[str] = ()) -> None:
        self.environ = dict(environ)
        self.names = {name for name in self.environ if CREDENTIAL_NAME.search(name) or NODE_SETTINGS.fullmatch(name)}
        self.names |= set(names)

    def add(self, names: Iterable[str]) -> None:
        """Count these variables (referenced as `{{NAME}}` by an environment file) as secrets from now on."""
        self.names |= set(names)

    def values(self) -> list[str]:
        """Every known secret value set on this node (long enough to mask without masking innocent text)."""
        return [self.environ[name] for name in sorted(self.names)
                if len(self.environ.get(name, "")) >= MIN_LENGTH]

    def without_secrets(self) -> dict[str, str]:
        """The node's environment as a pipeline may see it."""
        return {name: value for name, value in self.environ.items() if name not in self.names}

    def for_installers(self) -> dict[str, str]:
        """What uv or pip (and every build script they run) may see: no secrets but the installers' own settings.

        `PIP_*` and `UV_*` variables (an index password, say) are what installers
        are configured with, so they stay; `{{NAME}}` values reach the installer
        in its private requirements file instead.
        """
        return {name: value for name, value in self.environ.items()
                if name not in self.names or INSTALLER_SETTINGS.match(name)}
