"""The report card of a run: report.json (written by the speedrun) rendered as report.md and a self-contained
report.html (images embedded as base64, no external files or scripts), with a leaderboard of every run that
has a report.json in the same runs folder.

The document is a list of blocks (heading, paragraph, table, image, preformatted text) rendered twice, so the
Markdown and the HTML always say the same thing.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

EVAL_COLUMNS = [  # (key in an eval row, header, lower is better)
    ("bpb_en", "bits/byte EN ↓", True), ("bpb_zh", "bits/byte ZH ↓", True), ("chat_loss", "chat loss ↓", True),
    ("pref_accuracy", "pref. acc ↑", False), ("pref_margin", "pref. margin ↑", False),
    ("strategyqa_acc", "StrategyQA acc ↑", False), ("strategyqa_acc_norm", "acc_norm ↑", False),
]
STAGE_COLUMNS = [("seconds", "wall s"), ("steps", "steps"), ("tokens", "tokens"), ("tokens_per_s", "tokens/s"),
                 ("mfu", "MFU")]


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def headline(report: dict) -> dict:
    """The numbers a leaderboard compares: first and last model's English bits per byte, chat loss and
    preference accuracy, parameters, tokens trained on, total seconds."""
    rows = report.get("eval") or [{}]
    stages = report.get("stages", {})
    return {
        "run": report.get("name"),
        "date": (report.get("created") or "")[:10],
        "model": report.get("config", {}).get("base") or report.get("config", {}).get("size"),
        "parameters": report.get("model", {}).get("parameters"),
        "tokens": sum(s.get("tokens") or 0 for s in stages.values()),
        "minutes": round(sum(s.get("seconds") or 0 for s in stages.values()) / 60, 1),
        "bpb_en_start": rows[0].get("bpb_en"), "bpb_en": rows[-1].get("bpb_en"),
        "chat_loss": rows[-1].get("chat_loss"), "pref_accuracy": rows[-1].get("pref_accuracy"),
    }


def leaderboard(runs_dir: str | os.PathLike) -> list[dict]:
    """headline() of every runs_dir/*/report.json, best English bits per byte first."""
    rows = []
    for path in sorted(Path(runs_dir).glob("*/report.json")):
        try:
            rows.append(headline(json.loads(path.read_text(encoding="utf-8"))))
        except (json.JSONDecodeError, OSError, AttributeError, TypeError):
            continue  # a half-written or foreign file is not a run
    return sorted(rows, key=lambda r: (r["bpb_en"] is None, r["bpb_en"] or 0.0))


def blocks(report: dict, board: list[dict]) -> list[tuple]:
    """The document: ("h1"|"h2"|"p", text), ("table", headers, rows), ("img", file, alt), ("pre", text)."""
    out: list[tuple] = [("h1", f"llmlab speedrun: {report['name']}")]
    cfg, rows = report.get("config", {}), report.get("eval", [])
    what = f"fine-tuning {cfg['base']}" if cfg.get("base") else f"the {cfg.get('size')} model from scratch"
    out.append(("p", f"{report.get('created', '')} · {what} · budget {cfg.get('minutes')} minutes · "
                     f"`{report.get('command') or 'llmlab speedrun'}`"))
    if rows and rows[0].get("bpb_en") is not None and rows[-1].get("bpb_en") is not None:
        out.append(("p", f"Held-out English bits per byte: {rows[0]['bpb_en']:.3f} ({rows[0]['model']}) → "
                         f"{rows[-1]['bpb_en']:.3f} ({rows[-1]['model']})."))
    out.append(("h2", "Evaluation: every model of the run on the same held-out data"))
    cols = [c for c in EVAL_COLUMNS if any(c[0] in r for r in rows)]
    out.append(("table", ["model", *[h for _, h, _ in cols]], [[r["model"], *[_fmt(r.get(k)) for k, _, _ in cols]]
                                                             for r in rows]))
    out.append(("p", "Bits per byte: held-out prose (Hugging Face's sliding-window protocol, eval/perplexity.py). "
                     "Chat loss: nats per reply token on held-out conversations. Preference accuracy/margin: how "
                     "often (by how much) the mean log-prob of the true reply beats a reply to another question. "
                     "StrategyQA: lm-eval's scoring (0-shot, 2 choices, chance 0.5) when ../shared/data is present."))
    if report.get("images", {}).get("loss"):
        out.append(("h2", "Loss curves"))
        out.append(("img", report["images"]["loss"], "training and validation loss per stage"))
    out.append(("h2", "Stages"))
    stages = report.get("stages", {})
    out.append(("table", ["stage", *[h for _, h in STAGE_COLUMNS], "notes"],
                [[name, *[_fmt(s.get(k)) if k != "mfu" or s.get(k) is None else f"{s[k]:.1%}" for k, _ in STAGE_COLUMNS],
                  _stage_notes(name, s)] for name, s in stages.items()]))
    tok = report.get("tokenizer")
    if tok:
        out.append(("h2", "Tokenizer"))
        out.append(("table", ["kind", "vocabulary", "trained on (chars)", "bytes/token EN", "bytes/token ZH"],
                    [[tok.get("kind"), _fmt(tok.get("vocab_size")), _fmt(tok.get("train_chars")),
                      _fmt(tok.get("bytes_per_token_en")), _fmt(tok.get("bytes_per_token_zh"))]]))
    m = report.get("model", {})
    if m:
        out.append(("h2", "Model"))
        out.append(("table", ["parameters", "layers", "width", "heads / KV heads", "vocabulary", "context",
                              "fp32 MB", "bf16 MB", "KV bytes/token (bf16)"],
                    [[_fmt(m.get("parameters")), m.get("layers"), m.get("dim"), f"{m.get('heads')} / {m.get('kv_heads')}",
                      _fmt(m.get("vocab")), _fmt(m.get("context")), _fmt(m.get("fp32_mb")), _fmt(m.get("bf16_mb")),
                      _fmt(m.get("kv_bytes_per_token_bf16"))]]))
    if report.get("samples"):
        out.append(("h2", "Samples (greedy)"))
        out.append(("table", ["model", "prompt", "output"],
                    [[s["model"], s["prompt"], s["reply"].replace("\n", " ")[:200]] for s in report["samples"]]))
    env = report.get("environment", {})
    if env:
        out.append(("h2", "Environment"))
        out.append(("table", list(env), [[_fmt(v) for v in env.values()]]))
    if board:
        out.append(("h2", "Leaderboard: the runs in this folder"))
        keys = ["run", "date", "model", "parameters", "tokens", "minutes", "bpb_en_start", "bpb_en", "chat_loss",
                "pref_accuracy"]
        out.append(("table", keys, [[("**" + _fmt(r[k]) + "**") if k == "run" and r["run"] == report["name"]
                                     else _fmt(r[k]) for k in keys] for r in board]))
    final = report.get("final_model")
    if final:
        out.append(("h2", "Use the result"))
        out.append(("pre", f"llmlab chat {final}\nllmlab serve {final} --port 8000"))
    return out


def _stage_notes(name: str, s: dict) -> str:
    notes = []
    if "val_bpb_start" in s:
        notes.append(f"val bits/byte {s['val_bpb_start']:.3f} → {s['val_bpb_final']:.3f}")
    elif "val_loss_start" in s:
        notes.append(f"val loss {s['val_loss_start']:.3f} → {s['val_loss_final']:.3f}")
    if s.get("reward_accuracy_before") is not None:
        notes.append(f"held-out reward accuracy {s['reward_accuracy_before']:.2f} → {s['reward_accuracy_after']:.2f}")
    if s.get("peft"):
        notes.append(s["peft"])
    for key in ("chat_train", "chat_val"):
        if key in s:
            notes.append(f"{key.replace('_', ' ')}: {s[key]:,}")
    return "; ".join(notes)


def _md_cell(text) -> str:
    return str(text).replace("|", "\\|")


def to_markdown(doc: list[tuple]) -> str:
    lines = []
    for block in doc:
        kind = block[0]
        if kind == "h1":
            lines += [f"# {block[1]}", ""]
        elif kind == "h2":
            lines += [f"## {block[1]}", ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            headers, rows = block[1], block[2]
            lines.append("| " + " | ".join(map(_md_cell, headers)) + " |")
            lines.append("|" + "|".join("---" for _ in headers) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", ""]
        elif kind == "pre":
            lines += ["```", block[1], "```", ""]
    return "\n".join(lines)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:.92em}td,th{border:1px solid #ccc;padding:.3em .6em;
text-align:left}th{background:#f3f3f3}img{max-width:100%}pre{background:#f6f6f6;padding:.8em}code{background:#f3f3f3}"""


def _inline(text: str) -> str:
    """HTML-escape, then the two inline Markdown forms the report uses: **bold** and `code`."""
    parts = html.escape(str(text)).split("`")
    parts = [f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)]
    out = "".join(parts)
    while out.count("**") >= 2:
        out = out.replace("**", "<b>", 1).replace("**", "</b>", 1)
    return out


def to_html(doc: list[tuple], folder: Path) -> str:
    body = []
    for block in doc:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{_inline(block[1])}</{kind}>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif kind == "img":
            data = base64.b64encode((folder / block[1]).read_bytes()).decode("ascii")
            body.append(f'<img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">')
        elif kind == "pre":
            body.append(f"<pre>{html.escape(block[1])}</pre>")
    title = html.escape(doc[0][1]) if doc and doc[0][0] == "h1" else "llmlab report"
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title><style>{CSS}</style>"
            f"</head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(run_dir: str | os.PathLike) -> Path:
    """run_dir/report.json -> report.md and report.html beside it; returns the path of report.md."""
    run_dir = Path(run_dir)
    source = run_dir / "report.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: a report is written at the end of `llmlab speedrun`")
    report = json.loads(source.read_text(encoding="utf-8"))
    doc = blocks(report, leaderboard(run_dir.parent))
    _write(run_dir / "report.md", to_markdown(doc))
    _write(run_dir / "report.html", to_html(doc, run_dir))
    return run_dir / "report.md"


__all__ = ["blocks", "headline", "leaderboard", "to_html", "to_markdown", "write_report"]
