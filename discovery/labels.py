"""Offline labels: what the top examples' captions and tags say more often than the corpus does.

Each caption becomes a set of terms: words, bigrams and trigrams (stop words removed) and its aspect
tags as whole phrases. A term's score is the log-odds ratio, with an informative Dirichlet
prior (Monroe, Colaresi & Quinn 2008), of appearing in a top example's document versus a
corpus document, divided by its standard error. Counting documents rather than words keeps
long captions and MusicCaps boilerplate ("the low quality recording features...") from
dominating: a term everywhere has a ratio near one.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

# A standard English stop-word list (function words only; content words stay).
STOP_WORDS = frozenset("""
a about above after again against all am an and any are aren't as at be because been before being below
between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each
few for from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers herself
him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself let's me more most mustn't
my myself no nor not of off on once only or other ought our ours ourselves out over own same shan't she she'd
she'll she's should shouldn't so some such than that that's the their theirs them themselves then there there's
these they they'd they'll they're they've this those through to too under until up very was wasn't we we'd
we'll we're we've were weren't what what's when when's where where's which while who who's whom why why's with
won't would wouldn't you you'd you'll you're you've your yours yourself yourselves also just like one
""".split())
_WORD = re.compile(r"[a-z][a-z0-9'-]*")


def words(text: str) -> list[str]:
    return [w.strip("'-") for w in _WORD.findall(text.lower()) if w.strip("'-")]


def terms(caption: str, tags: Iterable[str] = ()) -> set[str]:
    """The document's terms: content words, runs of two or three adjacent content words, and its tags."""
    tokens = words(caption)
    content = [w not in STOP_WORDS and len(w) > 1 for w in tokens]
    out = {w for w, ok in zip(tokens, content) if ok}
    for n in (2, 3):
        for i in range(len(tokens) - n + 1):
            if all(content[i : i + n]):
                out.add(" ".join(tokens[i : i + n]))
    out.update(t for t in tags if t)
    return out


@dataclass(frozen=True)
class Label:
    """A label with how it was made and how sure it is."""

    text: str
    source: str
    confidence: float
    terms: tuple[tuple[str, float], ...] = ()


class Corpus:
    """Document frequencies of every term over all samples, computed once."""

    def __init__(self, documents: Sequence[set[str]]):
        self.documents = list(documents)
        self.df = Counter(t for doc in self.documents for t in doc)
        self.n = len(self.documents)
        self.tag_terms: set[str] = set()

    @classmethod
    def from_samples(cls, samples: Sequence[dict]) -> "Corpus":
        corpus = cls([terms(s.get("prompt", ""), s.get("tags", ())) for s in samples])
        corpus.tag_terms = {t for s in samples for t in s.get("tags", ())}
        return corpus

    def scores(self, chosen: Sequence[int], min_count: int = 2) -> list[tuple[str, float]]:
        """Terms over-represented in the chosen documents, best first (z-scored log-odds)."""
        counts = Counter(t for i in chosen for t in self.documents[i])
        n_top, n_all = len(chosen), self.n
        alpha0 = 10.0  # prior strength, spread by corpus frequency
        out = []
        for term, k in counts.items():
            if k < min(min_count, n_top):
                continue
            a = alpha0 * self.df[term] / max(n_all, 1)
            k_rest = self.df[term] - k
            n_rest = max(n_all - n_top, 1)
            top = math.log((k + a) / (n_top - k + alpha0 - a + 1e-9))
            rest = math.log((k_rest + a) / (n_rest - k_rest + alpha0 - a + 1e-9))
            var = 1 / (k + a) + 1 / (k_rest + a)
            out.append((term, (top - rest) / math.sqrt(var)))
        out.sort(key=lambda kv: (-kv[1], kv[0]))
        return out


def heuristic_label(corpus: Corpus, chosen: Sequence[int], top_terms: int = 5) -> Label:
    """The most distinctive term; among terms scoring within 80% of the best, a tag beats a
    caption phrase and a longer phrase beats a shorter one ("distorted electric guitar", not "distorted")."""
    ranked = corpus.scores(chosen)
    if not ranked:
        return Label(text="(no distinctive terms)", source="heuristic", confidence=0.0)
    best_score = ranked[0][1]
    near = [(t, s) for t, s in ranked if s >= 0.8 * best_score] if best_score > 0 else ranked[:1]
    text = max(near, key=lambda ts: (ts[0] in corpus.tag_terms, len(ts[0].split()), ts[1]))[0]
    support = sum(text in corpus.documents[i] for i in chosen) / max(len(chosen), 1)
    return Label(text=text, source="heuristic", confidence=round(support, 3), terms=tuple(ranked[:top_terms]))


def matches(label: str, caption: str, tags: Iterable[str]) -> bool:
    """Offline judge: do a document's terms contain the label (or all of its content words)?"""
    doc = terms(caption, tags)
    if label in doc:
        return True
    content = [w for w in words(label) if w not in STOP_WORDS]
    return bool(content) and all(w in doc for w in content)


def detection_score(label: str, positives: Sequence[dict], negatives: Sequence[dict]) -> float | None:
    """Balanced accuracy of the offline judge telling held-out top samples from random ones."""
    if not positives or not negatives:
        return None
    tpr = sum(matches(label, s.get("prompt", ""), s.get("tags", ())) for s in positives) / len(positives)
    tnr = sum(not matches(label, s.get("prompt", ""), s.get("tags", ())) for s in negatives) / len(negatives)
    return round((tpr + tnr) / 2, 4)
