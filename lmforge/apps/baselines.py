"""The baselines a sceptic names, as plain functions of the records: copy the source, the lead, and the
nearest neighbour (the training target whose source is most similar by character n-gram TF-IDF).

The same retrieval serves the applications' prompts: each prompt carries its nearest training
example (a translation memory, as translators' tools use), so a model beats the nearest-neighbour
baseline only by doing better than handing that example's answer back.
"""

from __future__ import annotations

import re
import sys

import numpy as np
from tqdm import tqdm

from lmforge.apps.task_records import TaskRecord


class NearestNeighbours:
    """Cosine similarity of character 3- and 4-gram TF-IDF vectors (within word boundaries, sublinear tf),
    fitted on the training sources."""

    def __init__(self, train_sources: list[str]):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 4), sublinear_tf=True,
                                          dtype=np.float32)
        self.matrix = self.vectorizer.fit_transform(train_sources).tocsr()

    def query(self, sources: list[str], exclude: list[str] | None = None, chunk: int = 2048,
              desc: str | None = None) -> tuple[list[int], list[float]]:
        """(the index of each source's most similar training source, that similarity: cosine, rounded to 4
        places so that the records written from it are the same bytes on every machine).

        exclude: the sources are the training sources themselves, and these are their keys: each one's own
        group is passed over, as a test record's group is never among the training records (leave one
        group out). desc: show progress under this name (stderr)."""
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(exclude or []):
            groups.setdefault(key, []).append(i)
        found: list[int] = []
        similarity: list[float] = []
        bar = tqdm(total=len(sources), unit="query", desc=desc, disable=desc is None, file=sys.stderr)
        for start in range(0, len(sources), chunk):
            sims = (self.vectorizer.transform(sources[start:start + chunk]) @ self.matrix.T).toarray()
            if exclude is not None:
                for row in range(sims.shape[0]):
                    sims[row, groups[exclude[start + row]]] = -1.0
            # argmax takes the first of equal scores: the lowest index, so ties break the same way everywhere
            best = sims.argmax(axis=1)
            found += best.tolist()
            similarity += [round(float(v), 4) for v in sims[np.arange(len(best)), best]]
            bar.update(sims.shape[0])
        bar.close()
        return found, similarity


def copy_source(record: TaskRecord) -> str:
    """Translation's floor: the English message unchanged."""
    return record.source


def name_words(name: str) -> str:
    """``get_item`` / ``getItem`` / ``HTTPServer`` -> ``get item`` / ``get item`` / ``http server``."""
    words = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name)
    return " ".join(words).lower()
