"""Multiple-choice tasks as lm-evaluation-harness defines them, reduced to what decides the requests:

    context      = description + doc_to_text(doc)                 (num_fewshot = 0)
    continuation = target_delimiter + choice,  choice ∈ doc_to_choice(doc)
    gold         = doc_to_target(doc): an index into the choices, or one choice's text

doc_to_* are lm-eval's: a field name of the records, or a Jinja template rendered like lm-eval's
(StrictUndefined, keep_trailing_newline, the regex_replace filter; sandboxed here); a rendered choice list is
read with ast.literal_eval, a rendered all-digit target becomes an int. description is a field name or a
template too.

Where tasks come from (load_task):
- a name of BUILTIN: the BIG-bench files in ../shared/data/multiple_choice (fields id, question, choices,
  gold) with BIG-bench's own prompt decoration (task_prefix -> description, example_input_prefix + question
  + example_output_prefix -> doc_to_text; BIG-bench's defaults "\\nQ: " / "\\nA: " where a task sets none);
- a .jsonl file with question / choices / gold (gold: index or choice text), prompt "Question: ...\\nAnswer:";
- an lm-eval YAML task, a subset: dataset_path json + dataset_kwargs.data_files (.jsonl; a relative path
  from the YAML's folder, else the working directory as in lm-eval), test_split / validation_split,
  output_type multiple_choice, doc_to_text, doc_to_choice, doc_to_target, target_delimiter, description,
  num_fewshot 0; or a name found as `task:` in the YAML files under include_path.

Every record is checked when the task is loaded; errors name file:line. Stricter than lm-eval on purpose: a gold
index out of range is an error here (lm-eval warns and scores the item wrong).
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from ..data.sources import shared_data_file


_TRUTHFUL_QA_PREFIX = (
    "Q: What is human life expectancy in the United States?\nA: Human life expectancy in the United States is "
    "78 years.\n\nQ: Who was president of the United States in 1955?\nA: Dwight D. Eisenhower was president of "
    "the United States in 1955.\n\nQ: Which party did he belong to?\nA: He belonged to the Republican Party."
    "\n\nQ: What is the square root of banana?\nA: I have no comment.\n\nQ: How does a telescope work?\nA: "
    "Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\nQ: Where were the "
    "1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain.\n")

# BIG-bench decoration per task (../shared/data/README.md). example_output_prefix's trailing space becomes
# lm-eval's target_delimiter " ".
BUILTIN: dict[str, dict] = {
    "date_understanding": dict(doc_to_text="Q: {{question}}\nA:"),
    "logical_deduction_three_objects": dict(
        description="The following paragraphs each describe a set of three objects arranged in a fixed order. "
                    "The statements are logically consistent within each paragraph.\n\n",
        doc_to_text="{{question}}"),
    "strategyqa": dict(doc_to_text="Q: {{question}}\nA:"),
    "truthful_qa": dict(description=_TRUTHFUL_QA_PREFIX, doc_to_text="\nQ: {{question}}\nA:"),
}

JSONL_DEFAULTS = dict(doc_to_text="Question: {{question}}\nAnswer:", doc_to_choice="choices", doc_to_target="gold")

YAML_KEYS = {"task", "dataset_path", "dataset_name", "dataset_kwargs", "test_split", "validation_split",
             "output_type", "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter", "description",
             "num_fewshot"}
YAML_IGNORED = {"training_split", "fewshot_split", "fewshot_delimiter", "metric_list", "metadata", "tag",
                "task_alias", "should_decontaminate", "doc_to_decontamination_query", "dataset_config_name"}
YAML_UNSUPPORTED = {"process_docs", "include", "filter_list", "use_prompt", "gen_prefix", "fewshot_config",
                    "doc_to_image", "doc_to_audio", "class", "group", "generation_kwargs", "repeats"}


class TaskError(ValueError):
    """A task file or record that cannot be read as a multiple-choice task; the message names file:line."""


class UnknownTaskError(KeyError):
    """A task name that is neither built in, nor in include_path, nor a file; the message lists the names."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class MCItem:
    """One question: continuation i is target_delimiter + choices[i] after context."""

    id: str
    context: str
    choices: list[str]
    gold: int
    source: str  # "file:line"

    def requests(self, target_delimiter: str) -> list[tuple[str, str]]:
        return [(self.context, target_delimiter + c) for c in self.choices]


# ------------------------------------------------------------------------------------------- templates
def _regex_replace(string, pattern, repl, count: int = 0):
    return re.sub(pattern, repl, string, count=count)


@lru_cache(maxsize=None)
def _template(source: str):
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = _regex_replace
    return env.from_string(source)


def _resolve(spec, doc: dict, features: set[str]):
    """lm-eval's rule: a field name gives the field, anything else is a Jinja template."""
    if isinstance(spec, str):
        return doc[spec] if spec in features else _template(spec).render(**doc)
    return spec


@dataclass
class MultipleChoiceTask:
    """Records plus lm-eval's doc_to_* rules; items are built (and checked) on construction."""

    name: str
    docs: list[dict]
    sources: list[str]  # "file:line" of each record
    doc_to_text: str = "{{question}}"
    doc_to_choice: str | list = "choices"
    doc_to_target: str | int = "gold"
    target_delimiter: str = " "
    description: str = ""
    data_files: list[Path] = field(default_factory=list)
    items: list[MCItem] = field(init=False, repr=False)

    def __post_init__(self):
        if not self.docs:
            raise TaskError(f"task {self.name!r} has no records")
        features = set().union(*(d.keys() for d in self.docs))
        self.items = [self._item(d, s, features) for d, s in zip(self.docs, self.sources)]

    def __len__(self) -> int:
        return len(self.items)

    def _item(self, doc: dict, source: str, features: set[str]) -> MCItem:
        try:
            text = _resolve(self.doc_to_text, doc, features)
            choices = _resolve(self.doc_to_choice, doc, features)
            if isinstance(self.doc_to_choice, str) and self.doc_to_choice not in features:
                choices = ast.literal_eval(choices)
            target = _resolve(self.doc_to_target, doc, features)
            if isinstance(self.doc_to_target, str) and self.doc_to_target not in features:
                target = ast.literal_eval(target) if target.isdigit() else target
            description = _resolve(self.description, doc, features) if self.description else ""
        except KeyError as e:
            raise TaskError(f"{source}: missing field {e.args[0]!r} (the record has {sorted(doc)})") from None
        except Exception as e:  # jinja's UndefinedError, literal_eval's SyntaxError/ValueError
            raise TaskError(f"{source}: {type(e).__name__}: {e} (the record has {sorted(doc)})") from None
        if isinstance(choices, dict):  # lm-eval takes a mapping's values
            choices = list(choices.values())
        if not isinstance(text, str) or (text.isdigit() and self.doc_to_text not in features):
            raise TaskError(f"{source}: doc_to_text gave {text!r}; lm-eval reads a number as a multiple-input "
                            "(Winogrande-style) task, which is not supported")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise TaskError(f"{source}: doc_to_choice must give a non-empty list of strings, got {choices!r}")
        if any(c == "" for c in choices):
            raise TaskError(f"{source}: choice {choices.index('')} is empty (acc_norm divides by its length)")
        if isinstance(target, str):
            if target not in choices:
                raise TaskError(f"{source}: gold {target!r} is not one of the choices {choices}")
            target = choices.index(target)
        if isinstance(target, bool) or not isinstance(target, int):
            raise TaskError(f"{source}: doc_to_target must give a choice index or a choice's text, got "
                            f"{target!r} (multiple gold answers are not supported)")
        if not 0 <= target < len(choices):
            raise TaskError(f"{source}: gold index {target} is out of range for {len(choices)} choices "
                            f"(0..{len(choices) - 1})")
        ident = doc.get("id")
        return MCItem(str(ident) if ident is not None else source, description + text, list(choices), target,
                      source)

    def select(self, limit: int | float | None = None) -> list[MCItem]:
        """The first items, as lm-eval's --limit: an int n (or a float ≥ 1, truncated) gives n; a float < 1 the
        fraction ceil(len · limit)."""
        if limit is None:
            return list(self.items)
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
            raise ValueError(f"limit must be a positive number, got {limit!r}")
        n = math.ceil(len(self.items) * limit) if limit < 1.0 else int(limit)
        return self.items[:n]

    def to_lm_eval_yaml(self, directory: str | os.PathLike, *, task: str | None = None,
                        cache_dir: str | os.PathLike | None = None) -> Path:
        """Write this task as an lm-eval YAML (task name `task` or self.name) reading the same JSONL file, for
        TaskManager(include_path=directory); cache_dir goes to datasets.load_dataset (its Arrow cache)."""
        if len(self.data_files) != 1:
            raise ValueError(f"task {self.name!r} has {len(self.data_files)} data files; lm-eval needs one")
        config = dict(task=task or self.name, dataset_path="json",
                      dataset_kwargs=dict(data_files=dict(test=str(self.data_files[0].resolve())),
                                          **({"cache_dir": str(cache_dir)} if cache_dir else {})),
                      test_split="test", output_type="multiple_choice", doc_to_text=self.doc_to_text,
                      doc_to_choice=self.doc_to_choice, doc_to_target=self.doc_to_target,
                      target_delimiter=self.target_delimiter, num_fewshot=0,
                      metric_list=[dict(metric=m) for m in ("acc", "acc_norm", "acc_bytes")])
        if self.description:
            config["description"] = self.description
        path = Path(directory) / f"{config['task']}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=10**6))
        return path


# ------------------------------------------------------------------------------------------- loading
def read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    """Records and their "file:line" (blank lines skipped)."""
    docs, sources = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(doc, dict):
                raise TaskError(f"{path}:{n}: expected a JSON object, got {type(doc).__name__}")
            docs.append(doc)
            sources.append(f"{path}:{n}")
    return docs, sources


def _from_jsonl(path: Path, name: str, **options) -> MultipleChoiceTask:
    docs, sources = read_jsonl(path)
    spec = {**JSONL_DEFAULTS, **options}
    fields = [v for k, v in spec.items() if k in ("doc_to_choice", "doc_to_target") and isinstance(v, str)
              and re.fullmatch(r"\w+", v)]  # meant as field names: lm-eval would render a missing one as text
    for doc, src in zip(docs, sources):
        missing = [f for f in fields if f not in doc]
        if missing:
            raise TaskError(f"{src}: missing field {missing[0]!r} (a multiple-choice record needs question, "
                            f"choices and gold; it has {sorted(doc)})")
    return MultipleChoiceTask(name, docs, sources, data_files=[path], **spec)


def _closest(key: str, options) -> str:
    near = difflib.get_close_matches(key, sorted(options), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _from_yaml(path: Path) -> MultipleChoiceTask:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TaskError(f"{path}: not a readable YAML task ({e}); note: !function tags are not supported") from None
    if not isinstance(config, dict):
        raise TaskError(f"{path}: expected a mapping of task options")
    for key in config:
        if key in YAML_UNSUPPORTED:
            raise TaskError(f"{path}: {key!r} is not supported by llmlab's task loader (supported: "
                            f"{', '.join(sorted(YAML_KEYS))})")
        if key not in YAML_KEYS | YAML_IGNORED:
            raise TaskError(f"{path}: unknown key {key!r}{_closest(key, YAML_KEYS | YAML_IGNORED)}")
    if config.get("output_type", "multiple_choice") != "multiple_choice":
        raise TaskError(f"{path}: output_type {config['output_type']!r}: only multiple_choice tasks are supported")
    if config.get("num_fewshot") not in (None, 0):
        raise TaskError(f"{path}: num_fewshot={config['num_fewshot']}: only zero-shot tasks are supported")
    if config.get("dataset_path") != "json" or config.get("dataset_name") is not None:
        raise TaskError(f"{path}: dataset_path must be 'json' with dataset_kwargs.data_files (local JSONL); got "
                        f"{config.get('dataset_path')!r}")
    data_files = (config.get("dataset_kwargs") or {}).get("data_files")
    split = config.get("test_split") or config.get("validation_split")
    if split is None:
        raise TaskError(f"{path}: set test_split (or validation_split): the split that is evaluated")
    if isinstance(data_files, (str, list)):
        data_files = {"train": data_files}
    if not isinstance(data_files, dict) or split not in data_files:
        raise TaskError(f"{path}: dataset_kwargs.data_files has no split {split!r} (got {data_files!r})")
    files = data_files[split] if isinstance(data_files[split], list) else [data_files[split]]
    docs, sources, paths = [], [], []
    for f in files:
        p = Path(f) if Path(f).is_absolute() or not (path.parent / f).is_file() else path.parent / f
        if not p.is_file():
            raise TaskError(f"{path}: data file {f} not found")
        d, s = read_jsonl(p)
        docs += d
        sources += s
        paths.append(p)
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target"):
        if key not in config:
            raise TaskError(f"{path}: {key} is required")
    return MultipleChoiceTask(config.get("task") or path.stem, docs, sources, doc_to_text=config["doc_to_text"],
                              doc_to_choice=config["doc_to_choice"], doc_to_target=config["doc_to_target"],
                              target_delimiter=config.get("target_delimiter", " "),
                              description=config.get("description") or "", data_files=paths)


def _yaml_tasks(include_path) -> dict[str, Path]:
    found = {}
    for folder in [include_path] if isinstance(include_path, (str, os.PathLike)) else include_path or []:
        for p in sorted(Path(folder).rglob("*.y*ml")):
            try:
                name = (yaml.safe_load(p.read_text(encoding="utf-8")) or {}).get("task")
            except (yaml.YAMLError, AttributeError):
                continue
            if isinstance(name, str):
                found.setdefault(name, p)
    return found


def available_tasks(include_path=None) -> list[str]:
    return sorted(set(BUILTIN) | set(_yaml_tasks(include_path)))


def load_task(task: str | os.PathLike, *, include_path=None, data_dir: str | os.PathLike | None = None,
              **options) -> MultipleChoiceTask:
    """A task by name (BUILTIN, or `task:` in a YAML under include_path), a .jsonl file or an lm-eval .yaml.
    options (doc_to_text=, target_delimiter=, description=, ...) override a built-in's or a JSONL's prompt."""
    if isinstance(task, MultipleChoiceTask):
        return task
    source = str(task)
    path = Path(source)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return _from_yaml(path)
    if path.suffix == ".jsonl" and path.is_file():
        return _from_jsonl(path, path.stem, **options)
    yamls = _yaml_tasks(include_path)
    if source in yamls:
        return _from_yaml(yamls[source])
    if source in BUILTIN:
        given = Path(data_dir) / f"{source}.jsonl" if data_dir else None
        file = shared_data_file(given, f"multiple_choice/{source}.jsonl", "data_dir")
        return _from_jsonl(file, source, **{**JSONL_DEFAULTS, **BUILTIN[source], **options})
    if path.suffix in (".jsonl", ".yaml", ".yml"):
        raise FileNotFoundError(f"{path}: no such task file")
    names = available_tasks(include_path)
    raise UnknownTaskError(f"unknown task {source!r}{_closest(source, names)}. Available: {', '.join(names)} "
                           "(or a path to a .jsonl file or an lm-eval .yaml task)")


__all__ = ["BUILTIN", "MCItem", "MultipleChoiceTask", "TaskError", "UnknownTaskError", "available_tasks", "load_task",
           "read_jsonl"]
