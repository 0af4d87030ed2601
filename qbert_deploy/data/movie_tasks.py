"""Real-text token-classification and QA tasks built from the movie-review snippets and VADER's human ratings.

Both files come from vaderSentiment 3.3.2's sdist on PyPI (as qbert_deploy.data.movie_reviews): the Rotten
Tomatoes snippets and `vader_lexicon.txt`, whose valence per word is the mean of ten human ratings (-4..+4).

- Token classification (CoNLL): each whitespace word of a snippet, stripped of surrounding punctuation and lower
  cased, is B-POS when its lexicon valence is >= +1.0, B-NEG when <= -1.0, O otherwise (or when not in the lexicon).
- Question answering (SQuAD v1.1): for a snippet with a B-POS word, "Which word in this review is the most
  positive?", answered by its highest-valence word (first occurrence on ties); likewise "... most negative?" with
  the lowest-valence B-NEG word. The answer is the word as written, at its character offset.

Splits follow the snippets' ids exactly as the sequence task does (sha256(id) mod 10: 0 test, 1 dev, else train).
Run `python -m qbert_deploy.data.movie_tasks OUT_DIR` to write {train,dev,test}.conll and .json.
"""

from __future__ import annotations

import string
import sys
import tarfile
from pathlib import Path

from qbert_deploy.data.conll import TaggedSentence, write_conll
from qbert_deploy.data.movie_reviews import (
    SPLITS,
    DataError,
    cached_from_sdist,
    snippets_file,
    split_of,
)
from qbert_deploy.data.squad import Answer, Question, write_squad

LEXICON = "vader_lexicon.txt"
LEXICON_SHA256 = "1ec9c6e9ee19aade328f8beb393a6afa71a5bb3acf7d3cc22d4ef568df374bf5"
TAGS = ["O", "B-NEG", "B-POS"]
THRESHOLD = 1.0
QUESTIONS = {"B-POS": "Which word in this review is the most positive?",
             "B-NEG": "Which word in this review is the most negative?"}


def lexicon_file() -> Path:
    """vader_lexicon.txt, fetched once into the cache and checked against its sha256."""
    return cached_from_sdist(LEXICON, LEXICON_SHA256, _extract_lexicon)


def _extract_lexicon(sdist: Path) -> bytes:
    with tarfile.open(sdist) as archive:
        member = next((m for m in archive.getmembers() if m.name.endswith(f"vaderSentiment/{LEXICON}")), None)
        handle = archive.extractfile(member) if member else None
        if handle is None:
            raise DataError(f"the vaderSentiment sdist has no {LEXICON}")
        return handle.read()


def load_lexicon() -> dict[str, float]:
    """Word -> mean human valence."""
    out = {}
    for line in lexicon_file().read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            out[parts[0].strip()] = float(parts[1])
    return out


def _snippets() -> list[tuple[str, str]]:
    out = []
    for line in snippets_file().read_bytes().decode("utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and "\t".join(parts[2:]).strip():
            out.append((parts[0].strip(), " ".join("\t".join(parts[2:]).split())))
    return out


def _word_tag(word: str, lexicon: dict[str, float]) -> tuple[str, float, str]:
    core = word.strip(string.punctuation)
    valence = lexicon.get(core.lower(), 0.0)
    tag = "B-POS" if valence >= THRESHOLD else "B-NEG" if valence <= -THRESHOLD else "O"
    return tag, valence, core


def build() -> dict[str, tuple[list[TaggedSentence], list[Question]]]:
    """Per split: the tagged sentences and the questions."""
    lexicon = load_lexicon()
    index = {t: i for i, t in enumerate(TAGS)}
    out: dict[str, tuple[list[TaggedSentence], list[Question]]] = {s: ([], []) for s in SPLITS}
    for snippet_id, text in _snippets():
        words = text.split(" ")
        tagged = [_word_tag(w, lexicon) for w in words]
        sentences, questions = out[split_of(snippet_id)]
        sentences.append(TaggedSentence(tuple(words), tuple(index[t] for t, _, _ in tagged)))
        offsets, position = [], 0
        for w in words:
            offsets.append(position)
            position += len(w) + 1
        for tag, question in QUESTIONS.items():
            sign = 1.0 if tag == "B-POS" else -1.0
            found = [(sign * v, -i) for i, (t, v, _) in enumerate(tagged) if t == tag]
            if not found:
                continue
            i = -max(found)[1]
            core = tagged[i][2]
            start = offsets[i] + words[i].index(core)
            questions.append(Question(f"{snippet_id}-{tag[2:].lower()}", question, text, (Answer(core, start),)))
    return out


def write_task_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, (sentences, questions) in build().items():
        paths[f"{split}.conll"] = folder / f"{split}.conll"
        write_conll(paths[f"{split}.conll"], sentences, TAGS)
        paths[f"{split}.json"] = folder / f"{split}.json"
        write_squad(paths[f"{split}.json"], questions)
    return paths


if __name__ == "__main__":
    for written in write_task_files(Path(sys.argv[1] if len(sys.argv) > 1 else "movie-tasks")).values():
        print(f"wrote {written}")
