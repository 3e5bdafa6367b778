"""The job spec: what a job file may say, validated, with errors that name the field and the fix.

A job file is YAML::

    name: gemm-demo                # optional (default: the file's name; see ``job_name``)
    backend: ray                   # ray (default) | local | mpi
    resources: {workers: 4, gpus: 0, address: null}   # address: a Ray cluster (Jobs API)
    max_retries: 1                 # per step, when a worker process dies; a step may override
    steps:
      - id: c
        op: gemm
        inputs: {a: data/A.zarr, b: data/B.zarr}    # "step:<id>" names an earlier step's output
        output: data/C.zarr
        params: {algorithm: auto}
        overwrite: false           # true: may replace an mx output another job or `mx data` wrote

Relative paths resolve against the job file's folder. Op-specific checks (inputs, params,
shapes) belong to each op and run in ``mx.tasks.plan``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import types
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mx.errors import UserError

STEP_REF = "step:"
SEED_MAX = 2**32 - 1  # seeds are mixed into 64-bit hashes with sweep and step counts
BACKENDS = ("ray", "local", "mpi")


class Strict(BaseModel):
    """Base of every spec model: unknown keys are errors, values are not coerced from strings."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Resources(Strict):
    workers: int | None = Field(default=None, ge=1, le=4096)
    gpus: int = Field(default=0, ge=0, le=4096)
    address: str | None = None
    # CPUs each worker reserves; default all of a self-started Ray's CPUs shared out, or 1 on
    # a cluster others share
    cpus_per_worker: float | None = Field(default=None, gt=0, le=1024)

    def cluster_address(self) -> str | None:
        """The Ray cluster to run on: ``address``, else $MX_RAY_ADDRESS, else $RAY_ADDRESS
        (set inside a Ray cluster's jobs); None means a local Ray started for the job."""
        return self.address or os.environ.get("MX_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS")

    def worker_count(self) -> int:
        """Workers asked for, or one per GPU, or 4 CPU workers."""
        if self.workers is not None:
            return self.workers
        return self.gpus if self.gpus > 0 else 4


class Step(Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    op: str
    inputs: dict[str, str]
    output: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    max_retries: int | None = Field(default=None, ge=0, le=100)  # default: the job's
    # an existing mx output is replaced only if a job of this name wrote it, or if this is true
    overwrite: bool = False

    @field_validator("inputs")
    @classmethod
    def _inputs_nonempty(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            if not path:
                raise ValueError(f"input '{name}' is empty; give a path or step:<id>")
        return value


class Job(Strict):
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    backend: Literal["ray", "local", "mpi"] = "ray"
    resources: Resources = Field(default_factory=Resources)
    # times a step is retried when a worker process dies under it (not when a task raises)
    max_retries: int = Field(default=1, ge=0, le=100)
    steps: list[Step] = Field(min_length=1)


def load(path: str) -> tuple[Job, str]:
    """Read and validate a job file; returns the job and the folder relative paths resolve in."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the job file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a text file (byte {exc.start} is not UTF-8); a job file "
                        f"is YAML text") from None
    return parse(text, source=path), os.path.dirname(os.path.abspath(path))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last
    one and drops the first without a word (a second ``params:`` would erase the first)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            twice = key in seen
        except TypeError:  # an unhashable key: construct_mapping names it
            continue
        if twice:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' is given twice in one mapping; keep one",
                key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def parse(text: str, source: str = "job") -> Job:
    """Validate job-file text (YAML) into a ``Job``."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{source}:{where} malformed YAML ({problem}); fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"{source}: a job file must be a YAML mapping with a 'steps' list, "
                        f"got {type(data).__name__}")
    return validate(Job, data, source=source)


def validate(model: type[BaseModel], data: Any, where: str = "", source: str | None = None):
    """Validate ``data`` against ``model``; the first problem becomes a one-line UserError
    that names ``source`` (the job file) once, then the field by its path in the job
    (``where`` is the path of ``data`` itself, e.g. ``steps[0] (id: c).params``)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message = describe_error(model, exc.errors()[0], where, data)
        raise UserError(f"{source}: {message}" if source else message) from None


# what a value of each type is called in an error, for fields that take more than one type
FORMS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def describe_error(model: type[BaseModel], err: dict, where: str = "", data: Any = None) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        loc = err["loc"]
        allowed = ", ".join(_fields_at(model, loc[:-1]))
        return _at(where, loc[:-1], data, f"unknown key '{loc[-1]}'; allowed keys here: {allowed}")
    loc, arms, field = _split(model, err["loc"])
    got = f"(got {err.get('input')!r})"
    if kind == "missing":
        return _at(where, loc, data, "required field is missing")
    if arms and field is not None:  # pydantic tried each type of the field in turn
        if field.description:
            return _at(where, loc, data, f"give {field.description} {got}")
        forms = [FORMS.get(t, getattr(t, "__name__", str(t)))
                 for t in typing.get_args(field.annotation) if t is not type(None)]
        return _at(where, loc, data, f"give {' or '.join(forms)} {got}")
    message = err["msg"]
    message = message[0].lower() + message[1:]
    return _at(where, loc, data, f"{message} {got}")


def _split(model: type[BaseModel], loc: tuple) -> tuple[tuple, tuple, Any]:
    """``loc`` cut where it stops naming fields, list items and mapping keys (what follows
    names the types of a union field, as pydantic tried them), and the last field reached."""
    followed, _, field = _walk(model, loc)
    return loc[:followed], loc[followed:], field


def _walk(model: type[BaseModel], loc: tuple) -> tuple[int, Any, Any]:
    """Follow ``loc`` from ``model`` through fields, list items and mapping keys: how many of
    its parts name those, the type reached, and the last field on the way."""
    current: Any = model
    field = None
    for i, part in enumerate(loc):
        current = _bare(current)
        origin = typing.get_origin(current)
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            field = current.model_fields[part]
            current = field.annotation
        elif origin is list and isinstance(part, int):
            current = typing.get_args(current)[0]
        elif origin is dict and isinstance(part, str):
            current = typing.get_args(current)[1]
        else:
            return i, current, field
    return len(loc), _bare(current), field


def _bare(annotation: Any) -> Any:
    """An optional type's one other type (pydantic names no union arm for it); others as is."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _at(where: str, loc: tuple, data: Any, message: str) -> str:
    """``message`` placed at ``loc`` under ``where``; a list item with an id (a step) is
    named by it too: ``steps[1] (id: d).max_retries``."""
    out = where
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            data = data[part] if isinstance(data, list) and 0 <= part < len(data) else None
            if isinstance(data, dict) and isinstance(data.get("id"), str):
                out += f" (id: {data['id']})"
        else:
            out += f".{part}"
            data = data.get(part) if isinstance(data, dict) else None
    out = out.lstrip(".")
    return f"{out}: {message}" if out else message


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the sub-model reached by following ``loc`` from ``model``."""
    _, current, _ = _walk(model, loc)
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def job_name(job: Job, job_file: str | None, base: str) -> str:
    """The job's name: ``name``, else the job file's name, else "job-" and a hash of what the
    job's steps write (``pipeline_hash``)."""
    if job.name:
        return job.name
    if job_file:
        return slug(os.path.splitext(os.path.basename(job_file))[0])
    return f"job-{pipeline_hash(job, base)}"


def pipeline_hash(job: Job, base: str) -> str:
    """A short hash of each step's id, op and resolved output path. A job may replace only the
    outputs its own name wrote, so unnamed jobs must not share one name (each would replace
    the others' results), yet a rerun with other params must keep its name (and so may
    replace its own output): params are left out."""
    steps = [[step.id, step.op, resolve_path(step.output, base)] for step in job.steps]
    return hashlib.sha256(json.dumps(steps).encode()).hexdigest()[:8]


def step_ref(value: str) -> str | None:
    """The step id named by ``step:<id>``, or None for a path."""
    if value.startswith(STEP_REF):
        return value[len(STEP_REF):]
    return None


def resolve_path(value: str, base: str) -> str:
    """An input/output path resolved against the job file's folder (``~`` expanded)."""
    path = os.path.expanduser(value)
    if not os.path.isabs(path):
        path = os.path.join(base, path)
    return os.path.normpath(path)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "job"
