"""What an environment is: its cache key, and the plan for building it.

The key hashes the normalised options and dependencies (the `{{NAME}}`
references, not their values), the interpreter's identity (real path,
implementation, full version, platform, C library) and a format version:
editing the file gives a new environment, identical files share one.

The plan says which installer builds it (uv, or virtualenv and pip for
options uv has no equivalent for) and how the dependencies reach the
installer: secret-free ones on its command line, secret-bearing ones as lines
of a private requirements file, and all of them masked for the log. Credentials
in git URLs go to git in its environment instead (see `git_credentials`).
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
from typing import Mapping

from poltergust.config import EnvironmentSpec
from poltergust.environments import git_credentials
from poltergust.environments.interpreters import Interpreter, InterpreterNotFound, cached, find
from poltergust.errors import RunFailed
from poltergust.masking import MIN_LENGTH, mask

FORMAT = 2
"""Bumped when the layout of an environment changes, so old ones are not mistaken for new ones."""

SECRET_REFERENCE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")

UV_OPTIONS = {"python", "system-site-packages", "prompt"}
"""`virtualenv:` options uv can honour itself."""
UV_IRRELEVANT = {"no-pip", "no-setuptools", "no-wheel", "no-seed", "without-pip", "clear", "no-download",
                 "never-download", "no-periodic-update", "no-vcs-ignore"}
"""Options about seeding pip or housekeeping that uv, which seeds nothing, satisfies as they are (when true)."""

VALUE_OPTIONS = {"-e", "--editable", "-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-c",
                 "--constraint", "-r", "--requirement", "--trusted-host", "--no-binary", "--only-binary"}
"""Installer options that take a value, for writing secret-bearing dependencies as requirement lines."""


class EnvironmentBuildError(RunFailed):
    """Building an environment failed; the message is one line for the error file."""


def key(spec: EnvironmentSpec, interpreter: Interpreter) -> str:
    """The cache key of `spec` built on `interpreter`."""
    identity = json.dumps({"content": normalised(spec), "interpreter": interpreter.identity()}, sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def normalised(spec: EnvironmentSpec) -> dict[str, object]:
    """What determines an environment's content, written one way (the interpreter is keyed apart)."""
    options = {}
    for name, value in spec.virtualenv.items():
        option = option_name(name)
        if option != "python":
            options[option] = value
    dependencies = [" ".join(shlex.quote(token) for token in shlex.split(dependency))
                    for dependency in spec.dependencies]
    return {"format": FORMAT, "virtualenv": dict(sorted(options.items())), "dependencies": dependencies}


def option_name(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def find_interpreter(spec: EnvironmentSpec, environ: Mapping[str, str]) -> Interpreter:
    """The interpreter `spec` asks for on this node (probed once per process)."""
    request = spec.virtualenv.get("python")
    try:
        return find(None if request is None else str(request), environ)
    except InterpreterNotFound as exc:
        hint = f" (write the version as a string: python: '{request}')" if isinstance(request, float) else ""
        raise EnvironmentBuildError(f"{spec.source}: virtualenv.python: {exc}{hint}") from None


def cached_interpreter(spec: EnvironmentSpec, environ: Mapping[str, str]) -> Interpreter | None:
    """The interpreter `spec` asks for if this process already found it (no I/O at all)."""
    return cached(spec.virtualenv.get("python"), environ)


def secrets(spec: EnvironmentSpec, environ: Mapping[str, str]) -> list[str]:
    """Values of the node variables the dependencies reference, to be masked in logs."""
    return [environ[name] for dependency in spec.dependencies for name in SECRET_REFERENCE.findall(dependency)
            if environ.get(name)]


def installer_settings(environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The environment for uv (pip settings translated) and the options uv only takes as flags."""
    env = dict(environ)
    env.pop("VIRTUAL_ENV", None)
    flags: list[str] = []
    if env.get("PIP_INDEX_URL") and not (env.get("UV_INDEX_URL") or env.get("UV_DEFAULT_INDEX")):
        env["UV_INDEX_URL"] = env["PIP_INDEX_URL"].strip()
    if env.get("PIP_EXTRA_INDEX_URL") and not env.get("UV_EXTRA_INDEX_URL"):
        env["UV_EXTRA_INDEX_URL"] = " ".join(env["PIP_EXTRA_INDEX_URL"].split())  # both space-separated
    if env.get("PIP_FIND_LINKS") and not env.get("UV_FIND_LINKS"):
        env["UV_FIND_LINKS"] = ",".join(env["PIP_FIND_LINKS"].split())  # pip: spaces; uv: commas
    if env.get("PIP_TRUSTED_HOST") and not env.get("UV_INSECURE_HOST"):
        env["UV_INSECURE_HOST"] = " ".join(env["PIP_TRUSTED_HOST"].split())
    if env.get("PIP_NO_INDEX", "").strip().lower() in ("1", "y", "yes", "t", "true", "on"):
        flags.append("--no-index")  # uv reads no variable for it
    return env, flags


class Plan:
    """How one environment is built: the installer, its options and the dependency arguments."""

    def __init__(self, spec: EnvironmentSpec, interpreter: Interpreter, environ: Mapping[str, str]) -> None:
        self.spec = spec
        self.interpreter = interpreter
        self.venv_options: list[str] = []
        self.fallback: str | None = None
        """Why uv cannot build this environment (then virtualenv and pip do)."""
        virtualenv_options: list[str] = []
        for name, value in spec.virtualenv.items():
            option = option_name(name)
            if option == "python":
                continue
            if value is None or value is False:
                continue
            argument = f"--{option}" if value is True else f"--{option}={value}"
            virtualenv_options.append(argument)
            if option == "system-site-packages":
                self.venv_options.append("--system-site-packages")
            elif option == "prompt":
                self.venv_options += ["--prompt", str(value)]
            elif option in UV_IRRELEVANT and value is True:
                pass
            elif self.fallback is None:
                self.fallback = f"uv has no equivalent of the virtualenv option {name}: {value}"
        if self.fallback:
            self.venv_options = virtualenv_options
        self.public: list[str] = []
        """Dependency arguments without secrets, for the command line."""
        self.private: list[str] = []
        """Requirement lines holding secrets, for the private requirements file."""
        self.display: list[str] = []
        """The dependency arguments as logged: secrets masked."""
        self.git_credentials: list[git_credentials.GitCredential] = []
        """Credentials taken out of git URLs, for git's environment."""
        for index, dependency in enumerate(spec.dependencies):
            references = SECRET_REFERENCE.findall(dependency)
            if not references:
                tokens = self._without_credentials(shlex.split(dependency), index)
                self.public += tokens
                self.display += tokens
                continue
            values = []
            for name in references:
                if name not in environ:
                    raise EnvironmentBuildError(
                        f"{spec.source}: dependencies[{index}]: references {{{{{name}}}}}, "
                        "which is not set on this node"
                    )
                values.append(environ[name])
            substituted = SECRET_REFERENCE.sub(lambda m: environ[m.group(1)], dependency)
            tokens = self._without_credentials(shlex.split(substituted), index)
            if any("git+" in token.lower() and any(len(value) >= MIN_LENGTH and value in token for value in values)
                   for token in tokens):
                raise EnvironmentBuildError(
                    f"{spec.source}: dependencies[{index}]: a secret in a git URL must be its user:password@ part "
                    "(anywhere else git would get it on its command line)")
            self.private += requirement_lines(tokens)
            self.display += [mask(token, values) for token in tokens]

    def _without_credentials(self, tokens: list[str], index: int) -> list[str]:
        """`tokens` with their git URLs' credentials moved to `git_credentials` (one per repository)."""
        stripped = []
        for token in tokens:
            token, found = git_credentials.strip(token)
            for credential in found:
                known = next((c for c in self.git_credentials if c.repository == credential.repository), None)
                if known is None:
                    self.git_credentials.append(credential)
                elif known != credential:
                    raise EnvironmentBuildError(
                        f"{self.spec.source}: dependencies[{index}]: {credential.repository} is given other "
                        "credentials than in an earlier dependency; git can use only one")
            stripped.append(token)
        return stripped

    @property
    def installer(self) -> str:
        return "virtualenv+pip" if self.fallback else "uv"


def requirement_lines(tokens: list[str]) -> list[str]:
    """Installer arguments as requirements-file lines (an option and its value on one line)."""
    lines: list[str] = []
    pending: str | None = None
    for token in tokens:
        if pending is not None:
            lines.append(f"{pending} {token}")
            pending = None
        elif token in VALUE_OPTIONS:
            pending = token
        elif token.startswith("--") and "=" in token and token.split("=", 1)[0] in VALUE_OPTIONS:
            lines.append(" ".join(token.split("=", 1)))
        else:
            lines.append(token)
    if pending is not None:
        lines.append(pending)
    return lines
