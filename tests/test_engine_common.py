"""Shared helpers of the engine tests: tiny random models with attached prefixes, solo references,
and a character-level tokenizer for stop-string tests."""
import torch

import softprompt
from softprompt.engine import Engine, SamplingParams
from test_integration_common import make_model, random_prefixes, random_rows, reference_generate

EOS = 3
LENGTHS = [5, 2, 0]


def setup(family="llama", lengths=LENGTHS, seed=0):
    """A tiny fp32 model of ``family``, its random cache-convention prefixes, and task names."""
    model = make_model(family, seed=seed)
    prefixes = random_prefixes(model, lengths, scale=2.0)
    return model, prefixes, list(prefixes)


def attach(model, prefixes):
    store = softprompt.attach(model, block_size=4)
    for name, (k, v) in prefixes.items():
        store.add(name, k, v)
    return store


def gen_kwargs(new):
    return dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=EOS)


def greedy(new):
    return SamplingParams(max_new_tokens=new, min_new_tokens=new)


def peft_reference(model, rows, tasks, prefixes, new):
    """PEFT-style generate of each row alone on the un-attached model (prefix in a DynamicCache)."""
    out = []
    for row, task in zip(rows, tasks):
        if task is None:
            ids = row[None]
            out.append(model.generate(ids, attention_mask=torch.ones_like(ids), **gen_kwargs(new))[0, len(row):].tolist())
        else:
            out.append(reference_generate(model, row, *prefixes[task], **gen_kwargs(new)).tolist())
    return out


def solo_generate(model, store, rows, tasks, new):
    """Each row alone through the attached model's own generate() with task_ids."""
    out = []
    for row, task in zip(rows, tasks):
        ids = row[None]
        kw = {} if task is None else {"task_ids": store.task_ids([task])}
        out.append(model.generate(ids, attention_mask=torch.ones_like(ids), **kw, **gen_kwargs(new))[0, len(row):].tolist())
    return out


def engine(model, **kw):
    kw.setdefault("eos_token_id", EOS)
    kw.setdefault("page_size", 4)
    return Engine(model, **kw)


class CharTokenizer:
    """Token id i <-> one character (ids 4.. map to 'a'..); enough for stop strings and streaming."""

    eos_token_id = EOS
    ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?-+*/=()[]{}<>#@$%&_~^'\"|\\`"

    def __init__(self, vocab):
        self.vocab = vocab

    def _char(self, i):
        return self.ALPHABET[(i - 4) % len(self.ALPHABET)] if i >= 4 else ""

    def __call__(self, text):
        return {"input_ids": [4 + self.ALPHABET.index(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self._char(int(i)) for i in ids)


def one_thread():
    """Tiny models run fastest (and far steadier on a busy machine) on one thread."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
