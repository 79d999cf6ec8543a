"""Parse and validate the two user-written YAML files.

Everything a user submits passes through here first, so every error names the
file and the key at fault: the message ends up, verbatim, as the `reason` of
the pipeline's error file.
"""
from __future__ import annotations

import json
import posixpath
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from poltergust.errors import RunFailed
from poltergust.run.worker_config import LuigiSettingError, parse_mapping

MAX_FILE_SIZE = 256 * 1024
"""Configs and environment files are hand-written; anything larger is a mistake or an attack."""

MODULE_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")

MAX_NODES = 10_000
"""Bound on YAML nodes after alias expansion, so a 'billion laughs' file is refused cheaply."""

MAX_DEPTH = 50
"""Bound on nesting: PyYAML composes recursively, and a file of 10 000 `[` would exhaust the stack."""


class ConfigError(RunFailed, ValueError):
    """A user file is invalid; the message says which file and which key."""

    def __init__(self, source: str, problem: str, key: str | None = None) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    module: str
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineConfig:
    source: str
    environment: str
    """Absolute URL of the environment file (relative references already resolved)."""
    task: TaskSpec
    variables: Mapping[str, str]
    document: Mapping[str, Any]
    """The whole parsed file, so result files can repeat the user's keys unchanged."""
    timeout: float | None = None
    """Seconds after which the run is stopped and ends as an error."""
    retries: int = 0
    """How many times a failed run is tried again on a node before the error is written."""
    nodes: int | None = None
    """At most this many nodes take part; None: as many as the graph has tasks for. See `all_nodes`."""
    all_nodes: bool = False
    """`nodes: all`: every node runs the pipeline from the start, as the original Poltergust did."""
    warm: bool = True
    """Start luigi from the environment's warm interpreter (false: a fresh interpreter every time)."""
    luigi: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """luigi's settings for this pipeline's runs (`luigi:`, section -> key -> value; see `run.worker_config`)."""


@dataclass(frozen=True)
class EnvironmentSpec:
    source: str
    virtualenv: Mapping[str, Any]
    dependencies: tuple[str, ...]
    variables: Mapping[str, str]
    preload: tuple[str, ...] = ()
    """Modules the environment's warm interpreter imports besides luigi."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents expanding to too many nodes."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_size(node, self.name)
        return super().construct_document(node)


class _BoundedFastLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The same limits on libyaml's parser, for the dashboard's many small reads."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_size(node, self.name)
        return super().construct_document(node)


def _flow_depth(text: str) -> int:
    """The deepest nesting of `[`/`{` (a cheap upper bound, quoted brackets included), checked before parsing."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(depth - 1, 0)
    return deepest


def _check_size(root: yaml.Node, source: str) -> None:
    seen = 0
    stack = [root]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise ConfigError(source, f"document too complex (more than {MAX_NODES} YAML nodes after expanding "
                                      "aliases)")
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.extend((key, value))


def load_yaml(data: bytes, source: str, fast: bool = False) -> dict[str, Any]:
    """Parse one YAML mapping, with size and structure limits (`fast`: with libyaml when installed)."""
    if len(data) > MAX_FILE_SIZE:
        raise ConfigError(source, f"file is {len(data)} bytes, the limit is {MAX_FILE_SIZE}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(source, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    depth = _flow_depth(text)
    if depth > MAX_DEPTH:
        raise ConfigError(source, f"nested too deeply ({depth} levels; the limit is {MAX_DEPTH})")
    try:
        loader = (_BoundedFastLoader if fast else _BoundedLoader)(text)  # checks for unprintable characters right away
    except yaml.YAMLError as exc:
        raise ConfigError(source, f"invalid YAML: {exc}".splitlines()[0]) from None
    loader.name = source
    try:
        document = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, f"invalid YAML: {problem}{at}") from None
    except RecursionError:
        raise ConfigError(source, f"nested too deeply (the limit is {MAX_DEPTH} levels)") from None
    finally:
        loader.dispose()
    if not isinstance(document, dict):
        raise ConfigError(source, f"expected a mapping at the top level, got {_kind(document)}")
    return document


def parse_pipeline(data: bytes, source: str) -> PipelineConfig:
    """Parse `NAME.config.yaml`; `source` is its URL, used in errors and to resolve relative paths."""
    document = load_yaml(data, source)
    environment = _required_str(document, "environment", source)
    task = document.get("task")
    if task is None:
        raise ConfigError(source, "required key is missing", "task")
    if not isinstance(task, dict):
        raise ConfigError(source, f"must be a mapping with name and module (got {_kind(task)})", "task")
    name = _required_str(task, "name", source, "task.name")
    module = _required_str(task, "module", source, "task.module")
    arguments = {}
    for key, value in task.items():
        if key in ("name", "module"):
            continue
        if not isinstance(key, str) or not key or key.startswith("-") or any(c.isspace() for c in key):
            raise ConfigError(source, "task arguments must be plain names like some-argument", f"task.{key}")
        arguments[key] = value
    timeout = document.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ConfigError(source, f"must be a positive number of seconds (got {timeout!r})", "timeout")
    retries = document.get("retries", 0)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 100:
        raise ConfigError(source, f"must be a whole number from 0 to 100 (got {retries!r})", "retries")
    nodes = document.get("nodes")
    if not (nodes is None or nodes == "all" or (isinstance(nodes, int) and not isinstance(nodes, bool) and nodes >= 1)):
        raise ConfigError(source, f"must be a whole number of nodes (1 or more) or all (got {nodes!r})", "nodes")
    warm = document.get("warm", True)
    if not isinstance(warm, bool):
        raise ConfigError(source, f"must be true or false (got {warm!r})", "warm")
    try:
        luigi_settings = parse_mapping(document.get("luigi"))
    except LuigiSettingError as exc:
        raise ConfigError(source, exc.problem, exc.key) from None
    return PipelineConfig(
        source=source,
        environment=resolve_reference(environment, source),
        task=TaskSpec(name=name, module=module, arguments=arguments),
        variables=_variables(document, source),
        document=document,
        timeout=float(timeout) if timeout is not None else None,
        retries=retries,
        nodes=nodes if isinstance(nodes, int) else None,
        all_nodes=nodes == "all",
        warm=warm,
        luigi=luigi_settings,
    )


def parse_environment(data: bytes, source: str) -> EnvironmentSpec:
    """Parse an environment file (`virtualenv`, `dependencies`, `variables`)."""
    document = load_yaml(data, source)
    unknown = sorted(set(map(str, document)) - {"virtualenv", "dependencies", "variables", "preload"})
    if unknown:
        raise ConfigError(source, "unknown key (expected virtualenv, dependencies, variables, preload)", unknown[0])
    options = document.get("virtualenv") or {}
    if not isinstance(options, dict):
        raise ConfigError(source, f"must be a mapping of options (got {_kind(options)})", "virtualenv")
    for key, value in options.items():
        if not isinstance(key, str) or isinstance(value, (dict, list)):
            raise ConfigError(source, "each option must be a name with a plain value", f"virtualenv.{key}")
    dependencies = document.get("dependencies") or []
    if not isinstance(dependencies, list):
        raise ConfigError(source, f"must be a list of strings (got {_kind(dependencies)})", "dependencies")
    for index, dependency in enumerate(dependencies):
        if not isinstance(dependency, str) or not dependency.strip():
            raise ConfigError(source, "each dependency must be a non-empty string", f"dependencies[{index}]")
        try:
            shlex.split(dependency)
        except ValueError as exc:
            raise ConfigError(source, f"cannot be split like a command line: {exc}", f"dependencies[{index}]") from None
    return EnvironmentSpec(
        source=source,
        virtualenv={k: options[k] for k in options},
        dependencies=tuple(dependencies),
        variables=_variables(document, source),
        preload=_preload(document, source),
    )


def _preload(document: Mapping[str, Any], source: str) -> tuple[str, ...]:
    modules = document.get("preload") or []
    if not isinstance(modules, list):
        raise ConfigError(source, f"must be a list of module names (got {_kind(modules)})", "preload")
    for index, module in enumerate(modules):
        if not isinstance(module, str) or not MODULE_NAME.fullmatch(module):
            raise ConfigError(source, f"must be a module name such as pandas or my_package.tasks (got {module!r})",
                              f"preload[{index}]")
    return tuple(modules)


def resolve_reference(reference: str, source: str) -> str:
    """Resolve an environment reference against the config's own location.

    Absolute URLs (`gs://`, `file://`) are kept; anything else is a path relative
    to the directory holding the config.
    """
    if "://" in reference:
        return reference
    scheme, rest = source.split("://", 1)
    host, _, path = rest.partition("/")
    directory = posixpath.dirname("/" + path)
    return f"{scheme}://{host}{posixpath.normpath(posixpath.join(directory, reference))}"


def _required_str(mapping: Mapping[str, Any], key: str, source: str, label: str | None = None) -> str:
    value = mapping.get(key)
    if value is None:
        raise ConfigError(source, "required key is missing", label or key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(source, f"must be a non-empty string (got {_kind(value)})", label or key)
    return value.strip()


def _variables(document: Mapping[str, Any], source: str) -> dict[str, str]:
    variables = document.get("variables") or {}
    if not isinstance(variables, dict):
        raise ConfigError(source, f"must be a mapping of NAME: value (got {_kind(variables)})", "variables")
    result = {}
    for key, value in variables.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise ConfigError(source, "not a valid environment variable name", f"variables.{key}")
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(source, f"must be a plain value (got {_kind(value)})", f"variables.{key}")
        result[key] = value if isinstance(value, str) else json.dumps(value)
    return result


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), type(value).__name__)
