"""Multiple-choice tasks defined by data: one small YAML file per task, validated with errors by name.

A task YAML (keys; only `file`, `prompt`, `answer_field` and one of `choices_field`/`choices` are needed):

    name: xcopa                         # default: the YAML file's stem
    description: XCOPA-it, causal commonsense (500 test items)
    file: xcopa-it/xcopa_it_test.mc.jsonl   # JSONL (optionally .xz/.gz), relative to the data root
    format: jsonl
    filter: {split: test}               # keep records whose field equals the value (or is in a list)
    prompt: "{{ question }} ..."        # Jinja: the context every choice is scored after
    choices_field: choices              # the record field holding the list of choice texts, or
    choices: ["Sì", "No"]               # a fixed list of choice texts
    choice_template: " {{ choice }}"    # the continuation scored for each choice (also sees the fields)
    answer_field: answer                # the record field with the right choice: a 0-based index, or
    answer_map: {SUPPORTS: 0}           # a label mapped to the index
    fewshot: {file: ..., filter: {...}} # where few-shot examples come from (default: the task's items)
    fewshot_separator: "\\n\\n"
    preamble: ""                        # text before the few-shot examples and the question
    group_by: macro_category            # also report accuracy per value of this field
    metrics: [acc, acc_norm]            # of acc, acc_norm, mcc (Matthews, two-choice tasks)

Design choices, and why:
- Templates are Jinja (the language of Hugging Face chat templates), rendered in a sandbox with strict
  undefined variables: a prompt can branch (`{{ 'perché' if question_type == 'cause' else 'quindi' }}`)
  and a misspelt field is an error naming the YAML key and the data line, never an empty string.
- Every item is validated when the task loads (choices present, answer in range), so a bad record fails
  before any model time is spent, with the file and line.
- The data root is `--data-dir`, else `$FUCINA_DATA_DIR`, else `../shared/data` (see `heldout.py`); an
  absolute `file` is used as is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fucina.config import from_dict, load_yaml
from fucina.errors import ConfigError, DataError
from fucina.evaluate.heldout import iter_jsonl_records

METRIC_NAMES = ("acc", "acc_norm", "mcc")
TEMPLATE_KEYS = ("prompt", "choice_template", "preamble")


@dataclass
class FewShotSpec:
    """Where few-shot examples come from; `file: null` means the task's own file."""

    file: str | None = None
    filter: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskSpec:
    """One multiple-choice task as written in its YAML file (see the module doc)."""

    file: str
    prompt: str
    answer_field: str
    name: str = ""
    description: str = ""
    format: Literal["jsonl"] = "jsonl"
    filter: dict[str, Any] = field(default_factory=dict)
    choices_field: str | None = None
    choices: list[str] | None = None
    choice_template: str = " {{ choice }}"
    answer_map: dict[Any, int] | None = None
    fewshot: FewShotSpec | None = None
    fewshot_separator: str = "\n\n"
    preamble: str = ""
    group_by: str | None = None
    metrics: list[str] = field(default_factory=lambda: ["acc", "acc_norm"])
    source: str = field(default="", init=False, repr=False)  # the YAML file it came from (set by the loader)


@dataclass(frozen=True)
class TaskItem:
    """One validated record of a task: its fields, choice texts, right answer and where it came from."""

    record: dict[str, Any]
    choices: tuple[str, ...]
    answer: int
    path: Path
    line: int


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
    )


def compile_template(source: str, where: str) -> jinja2.Template:
    """A Jinja template; ConfigError naming `where` (file and key) on a syntax error."""
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"{where}: invalid template: {err.message} (template line {err.lineno})") from None


def render(template: jinja2.Template, variables: dict[str, Any], where: str, path: Path, line: int) -> str:
    """Render one template for one record; DataError naming the data line and the template key."""
    try:
        return template.render(**variables)
    except jinja2.UndefinedError as err:
        raise DataError(f"{where}: {err.message}", path, line) from None
    except jinja2.TemplateError as err:
        raise DataError(f"{where}: cannot render: {err}", path, line) from None
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as err:
        raise DataError(f"{where}: cannot render: {type(err).__name__}: {err}", path, line) from None


def builtin_tasks_dir() -> Path:
    return Path(str(resources.files("fucina.evaluate") / "tasks"))


def builtin_task_names() -> list[str]:
    """Names of the task YAMLs shipped with fucina (src/fucina/evaluate/tasks/*.yaml)."""
    return sorted(path.stem for path in builtin_tasks_dir().glob("*.yaml"))


def task_path(name_or_path: str | Path) -> Path:
    """The YAML of a built-in task name, or a user's YAML path; ConfigError naming what was asked."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text or Path(text).is_file():
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"task file not found: {path}")
        return path
    path = builtin_tasks_dir() / f"{text}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown task '{text}'; built-in tasks: {', '.join(builtin_task_names())} (or a path to a YAML)"
        )
    return path


def load_task_spec(name_or_path: str | Path) -> TaskSpec:
    """Read and validate a task YAML (a built-in name or a path); errors name the file and the key."""
    path = task_path(name_or_path)
    data = load_yaml(path)
    try:
        spec = from_dict(TaskSpec, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    spec.name = spec.name or path.stem
    spec.source = str(path)
    _validate_spec(spec, path)
    return spec


def _validate_spec(spec: TaskSpec, path: Path) -> None:
    if (spec.choices_field is None) == (spec.choices is None):
        raise ConfigError(
            f"{path}: give exactly one of 'choices_field' (a record field) or 'choices' (a list)"
        )
    if spec.choices is not None and len(spec.choices) < 2:
        raise ConfigError(f"{path}: key 'choices' needs at least two choices, got {spec.choices!r}")
    for metric in spec.metrics:
        if metric not in METRIC_NAMES:
            raise ConfigError(
                f"{path}: key 'metrics': unknown metric {metric!r} (known: {', '.join(METRIC_NAMES)})"
            )
    if spec.answer_map is not None:
        for label, index in spec.answer_map.items():
            if isinstance(index, bool) or not isinstance(index, int):
                raise ConfigError(f"{path}: key 'answer_map.{label}' must be a choice index, got {index!r}")
    for key in TEMPLATE_KEYS:
        compile_template(getattr(spec, key), f"{path}: key '{key}'")


def resolve_task_file(spec: TaskSpec, relative: str, data_dir: Path, key: str) -> Path:
    """The data file a task names, relative to the data root; ConfigError naming the YAML key if missing."""
    path = Path(relative)
    path = path if path.is_absolute() else data_dir / path
    if not path.is_file():
        raise ConfigError(f"{spec.source}: key '{key}': data file not found: {path}")
    return path


def _matches(record: dict[str, Any], conditions: dict[str, Any], path: Path, line: int, key: str) -> bool:
    for name, wanted in conditions.items():
        if name not in record:
            raise DataError(f"record has no field '{name}' (used by '{key}')", path, line)
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if record[name] not in allowed:
            return False
    return True


def _choices_of(spec: TaskSpec, record: dict[str, Any], path: Path, line: int) -> tuple[str, ...]:
    if spec.choices is not None:
        return tuple(spec.choices)
    if spec.choices_field not in record:
        raise DataError(
            f"record has no field '{spec.choices_field}' (key 'choices_field' of {spec.source})", path, line
        )
    choices = record[spec.choices_field]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"field '{spec.choices_field}' must be a list of at least two strings", path, line)
    return tuple(choices)


def _answer_of(spec: TaskSpec, record: dict[str, Any], num_choices: int, path: Path, line: int) -> int:
    where = f"key 'answer_field' of {spec.source}"
    if spec.answer_field not in record:
        raise DataError(f"record has no field '{spec.answer_field}' ({where})", path, line)
    value = record[spec.answer_field]
    if spec.answer_map is not None:
        if value not in spec.answer_map:
            known = ", ".join(map(repr, spec.answer_map))
            raise DataError(f"answer {value!r} is not in 'answer_map' of {spec.source} ({known})", path, line)
        value = spec.answer_map[value]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_choices:
        raise DataError(
            f"bad answer index {value!r} for {num_choices} choices ({where}; 0-based)", path, line
        )
    return value


def read_items(spec: TaskSpec, path: Path, conditions: dict[str, Any], key: str = "filter") -> list[TaskItem]:
    """The validated records of `path` that match `conditions`, in file order."""
    items = []
    for line, record in iter_jsonl_records(path):
        if not _matches(record, conditions, path, line, key):
            continue
        choices = _choices_of(spec, record, path, line)
        answer = _answer_of(spec, record, len(choices), path, line)
        items.append(TaskItem(record, choices, answer, path, line))
    if not items:
        raise DataError(f"no items for task '{spec.name}' (key '{key}' of {spec.source}: {conditions})", path)
    return items


def load_items(spec: TaskSpec, data_dir: Path) -> list[TaskItem]:
    """The task's evaluation items."""
    return read_items(spec, resolve_task_file(spec, spec.file, data_dir, "file"), spec.filter)


def load_fewshot_pool(spec: TaskSpec, data_dir: Path) -> list[TaskItem]:
    """The items few-shot examples are drawn from (the task's own items when no `fewshot` is given)."""
    if spec.fewshot is None:
        return load_items(spec, data_dir)
    key = "fewshot.file" if spec.fewshot.file else "file"
    path = resolve_task_file(spec, spec.fewshot.file or spec.file, data_dir, key)
    return read_items(spec, path, spec.fewshot.filter, key="fewshot.filter")
