"""Answers from passages: the generator's prompt, and the extractive answer used when no generator is configured."""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
STOPWORDS = frozenset(
    "a an and are as at be by can do does for from how i in is it its of on or so that the this to was what when "
    "where which who why will with you your does did which there their they then than into".split()
)
EXTRACTIVE_NOTE = "extractive answer: no generator is configured, these are the best-matching passages' sentences"


def _terms(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


def extractive_answer(question: str, passages: list[str], max_sentences: int = 2, max_chars: int = 600) -> str:
    """The sentences from the top passages that share the most terms with the question, in passage order.

    Passages arrive best first; a sentence's score is its overlap with the question, ties going to better passages;
    a second sentence joins only if it scores at least 60% of the best one.
    """
    wanted = _terms(question)
    scored: list[tuple[float, int, int, str]] = []
    for p_index, passage in enumerate(passages[:3]):
        for s_index, sentence in enumerate(_SENTENCE.split(passage.replace("\n", " "))):
            sentence = sentence.strip()
            if len(sentence) < 3:
                continue
            overlap = len(wanted & _terms(sentence))
            scored.append((overlap - 0.1 * p_index, p_index, s_index, sentence))
    if not scored:
        return ""
    ranked = sorted(scored, key=lambda s: (-s[0], s[1], s[2]))
    floor = 0.6 * ranked[0][0]
    best = [s for s in ranked[:max_sentences] if s[0] >= floor] or ranked[:1]
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
