"""Answers from passages: the generator's prompt, and the extractive answer used when no generator is configured."""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9]+")
# a sentence ends at . ! or ? after a word of two letters or more (not "1." of a list, not "e.g" inside a word),
# before a capital, digit, quote or bracket
_SENTENCE = re.compile(r"(?<=[^\W\d_]{2}[.!?])\s+(?=[A-Z0-9\"'(*•-])")
_LIST_MARKER = re.compile(r"^(?:[-*•·]\s*)?(?:\(?\d{1,3}[.)]\s+|[a-z][.)]\s+)?")
STOPWORDS = frozenset(
    "a an and are as at be by can do does for from how i in is it its of on or so that the this to was what when "
    "where which who why will with you your does did which there their they then than into".split()
)
EXTRACTIVE_NOTE = "extractive answer: no generator is configured, these are the best-matching passages' sentences"


def _terms(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


def sentences(passage: str) -> list[str]:
    """A passage's sentences, list markers ("- 1.", "2)") taken off, fragments of fewer than three words dropped."""
    out = []
    for line in passage.splitlines():
        for sentence in _SENTENCE.split(line.strip()):
            sentence = _LIST_MARKER.sub("", sentence.strip()).strip()
            if len(_WORD.findall(sentence)) >= 3:
                out.append(sentence)
    return out


def extractive_answer(question: str, passages: list[str], max_sentences: int = 2, max_chars: int = 600) -> str:
    """The sentences from the top passages that share the most terms with the question, in passage order.

    Passages arrive best first. Only passages that share terms with the question count (at least half as many as
    the best passage shares); a sentence's score is its overlap with the question, ties going to better passages;
    a second sentence joins only if it scores at least 60% of the best one; a sentence said twice is said once.
    """
    wanted = _terms(question)
    relevance = [len(wanted & _terms(p)) for p in passages[:3]]
    best_passage = max(relevance, default=0)
    scored: list[tuple[float, int, int, str]] = []
    for p_index, passage in enumerate(passages[:3]):
        if best_passage and relevance[p_index] * 2 < best_passage:
            continue   # a passage about something else: its sentences would only pad the answer
        for s_index, sentence in enumerate(sentences(passage)):
            overlap = len(wanted & _terms(sentence))
            scored.append((overlap - 0.1 * p_index, p_index, s_index, sentence))
    if not scored:
        return ""
    ranked = sorted(scored, key=lambda s: (-s[0], s[1], s[2]))
    floor = 0.6 * ranked[0][0]
    best: list[tuple[float, int, int, str]] = []
    said: set[str] = set()
    for candidate in ranked:
        key = " ".join(_WORD.findall(candidate[3].lower()))
        if key in said:
            continue
        if best and (candidate[0] < floor or candidate[0] <= 0 or len(best) >= max_sentences):
            break
        said.add(key)
        best.append(candidate)
    best.sort(key=lambda s: (s[1], s[2]))
    answer = " ".join(s[3] for s in best)
    return answer if len(answer) <= max_chars else answer[: max_chars - 1].rstrip() + "…"


def generation_prompt(question: str, passages: list[str]) -> str:
    context = "\n\n".join(f"[{i + 1}] {p}" for i, p in enumerate(passages))
    return (
        "Answer the question using only the numbered passages below. Cite passages like [1]. "
        "If they do not contain the answer, say so.\n\n"
        f"Passages:\n{context}\n\nQuestion: {question}\nAnswer:"
    )
