"""SQuAD v1.1 JSON: {"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers"}]}]}]}."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbert_deploy.atomic import write_text_atomic


class SquadError(ValueError):
    """A data file that cannot be read as SQuAD v1.1."""


@dataclass(frozen=True)
class Answer:
    text: str
    start: int  # character offset into the context


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    context: str
    answers: tuple[Answer, ...]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SquadError(message)


def read_squad(path: str | Path) -> list[Question]:
    """Every question; each answer's text must be at its answer_start in the context."""
    path = Path(path)
    _check(path.is_file(), f"{path}: no such data file")
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SquadError(f"{path}: not JSON ({err})") from None
    _check(isinstance(data, dict) and isinstance(data.get("data"), list),
           f"{path}: not SQuAD v1.1 JSON (no 'data' list)")
    out = []
    for a, article in enumerate(data["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise SquadError(f"{path}: data[{a}] has no 'paragraphs' list")
        for p, paragraph in enumerate(paragraphs):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            _check(isinstance(paragraph, dict), f"{where} is not an object")
            context = paragraph.get("context")
            _check(isinstance(context, str) and bool(context.strip()), f"{where} has no context")
            qas = paragraph.get("qas")
            _check(isinstance(qas, list), f"{where} has no 'qas' list")
            for q, qa in enumerate(qas):
                out.append(_question(qa, context, f"{where}.qas[{q}]"))
    _check(bool(out), f"{path}: no questions")
    return out


def _question(qa: Any, context: str, where: str) -> Question:
    _check(isinstance(qa, dict) and isinstance(qa.get("question"), str) and bool(qa["question"].strip()),
           f"{where} has no question")
    answers = qa.get("answers")
    _check(isinstance(answers, list) and len(answers) > 0, f"{where} has no answers")
    parsed = []
    for n, answer in enumerate(answers):
        text, start = (answer.get("text"), answer.get("answer_start")) if isinstance(answer, dict) else (None, None)
        if not (isinstance(text, str) and text and isinstance(start, int) and not isinstance(start, bool)):
            raise SquadError(f"{where}.answers[{n}] needs 'text' and an integer 'answer_start'")
        found = context[start:start + len(text)]
        _check(found == text, f"{where}.answers[{n}]: answer_start {start} points at {found!r}, "
                              f"not at the answer text {text!r}")
        parsed.append(Answer(text, start))
    return Question(str(qa.get("id", where)), qa["question"], context, tuple(parsed))


def write_squad(path: Path, questions: list[Question]) -> None:
    paragraphs: dict[str, list[dict[str, Any]]] = {}
    for q in questions:
        paragraphs.setdefault(q.context, []).append(
            {"id": q.id, "question": q.question,
             "answers": [{"text": a.text, "answer_start": a.start} for a in q.answers]})
    data = {"version": "1.1", "data": [{"title": "qbert", "paragraphs": [
        {"context": c, "qas": qas} for c, qas in paragraphs.items()]}]}
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")
