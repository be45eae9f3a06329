"""The evaluation study: hand-written prompts, soft prompts and fine-tuning on the same splits.

For a decoder LM (SmolLM2-135M: label words read from the LM head) and an encoder (all-MiniLM-L6-v2:
a classification head), on binary sentiment with audited train / validation / test splits:

1. hand-written prompts (zero- and few-shot, the chat template among them) are scored on
   validation; the best there is the one reported on test (all are shown on test for reference);
2. every trained method gets the same training rows, batch order (per seed), step budget, optimizer
   and schedule; its recipe is picked by a small sweep on validation with the first seed (whose run
   of the chosen recipe is that seed's result), then the other seeds run with it;
3. test accuracy is reported as mean and spread over seeds with a Wilson 95% interval, next to
   trainable parameters, step time, training memory and storage per task.
"""
from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import recipes as R
from .learners import (EncoderRows, LMRows, PlainEncoder, PlainLM, SoftPromptEncoder, SoftPromptLM,
                       SoftPromptLMClassifier)
from .loop import evaluate, train
from .stats import summarize, wilson


@dataclass
class StudyConfig:
    """Sizes and budgets. ``steps`` / ``batch_size`` are the LM's budget (every LM method), ``encoder_*``
    the encoder's."""

    n_train: int = 400
    n_val: int = 200
    n_test: int = 400
    steps: int = 30
    batch_size: int = 8
    encoder_steps: int = 150
    encoder_batch_size: int = 16
    seeds: Sequence[int] = (0, 1, 2)
    sweep: bool = True
    lm_methods: Sequence[str] = R.LM_METHODS
    encoder_methods: Sequence[str] = R.ENCODER_METHODS
    eval_batch_size: int = 16
    split_seed: int = 0
    hard_prompts: bool = True


FULL = StudyConfig()
QUICK = StudyConfig(n_train=32, n_val=16, n_test=16, steps=2, batch_size=4, encoder_steps=2, encoder_batch_size=4,
                    seeds=(0,), sweep=False)


@dataclass
class Models:
    """How to get the models: ``*_factory()`` returns a fresh model (LoRA and full fine-tuning change
    it); ``lm`` is the shared frozen base the prompts and hand-written prompts run on."""

    lm_name: str
    lm_factory: Callable
    lm_tokenizer: object
    encoder_name: Optional[str] = None
    encoder_factory: Optional[Callable] = None
    encoder_tokenizer: object = None
    lm: object = field(default=None, repr=False)


class Runner:
    """Runs the parts of the study. ``done`` holds finished runs (keyed by :func:`run_key`), which are
    reused instead of trained again; ``on_run`` is called with every new run (to save progress).
    With ``train=False`` nothing runs: only finished runs are summarised (a report of a cut-short run)."""

    def __init__(self, cfg: StudyConfig, models: Models, task, log: Callable[[str], None] = print,
                 done: Optional[Dict[str, dict]] = None, on_run: Optional[Callable[[str, dict], None]] = None,
                 train: bool = True):
        from ..model import SoftPromptModel
        self.cfg, self.models, self.task, self.log = cfg, models, task, log
        self.done, self.on_run, self.train = dict(done or {}), on_run, train
        self.lm = models.lm if models.lm is not None else models.lm_factory()
        self.lm.eval()
        self.spm = SoftPromptModel(self.lm)
        self.rows = LMRows(models.lm_tokenizer, task.soft_row, task.labels)
        self.count = 0

    # ------------------------------------------------------------------ hand-written prompts
    def hard_prompts(self) -> dict:
        from . import PromptSpec, evaluate_prompts
        specs = {h.name: h for h in self.task.hard_prompts()}
        prompts = [PromptSpec(h.name, h.row, prefix=h.prefix) for h in specs.values()]
        val, test = self.task.validation, self.task.test
        self.log(f"hand-written prompts: {len(prompts)} on validation ({len(val)} rows) and test ({len(test)} rows)")
        # one call for both splits: each prompt's prefix is compiled once
        res = evaluate_prompts(self.spm, self.models.lm_tokenizer, prompts, list(val) + list(test), self.task.labels,
                               batch_size=self.cfg.eval_batch_size)
        out = {}
        for name, r in res.items():
            entry = out.setdefault(name, {"shots": specs[name].shots, "chat": "<|im_start|>" in specs[name].prefix})
            for split, rows, preds in (("validation", val, r["predictions"][:len(val)]),
                                       ("test", test, r["predictions"][len(val):])):
                correct = sum(int(p == y) for p, (_, y) in zip(preds, rows))
                entry[split] = {"accuracy": correct / len(rows), "correct": correct, "n": len(rows)}
        best = max(out, key=lambda k: out[k]["validation"]["accuracy"])     # first wins a tie
        for name, e in out.items():
            e["selected_on_validation"] = name == best
            t = e["test"]
            e["test"]["ci"] = wilson(t["correct"], t["n"])
        return {"prompts": out, "selected": best}

    # ------------------------------------------------------------------ trained methods
    def learner(self, method: str, recipe: dict, seed: int):
        from ..training.cli import method_config
        from . import baselines
        torch.manual_seed(seed)
        self.count += 1
        tok = self.models.lm_tokenizer
        if method in R.SOFT_LM or method == "p_tuning_v2_classifier":
            prompt = "p_tuning_v2" if method == "p_tuning_v2_classifier" else method     # the same prefix
            text = self.task.init_text if recipe.get("init") == "text" else ""
            config = method_config(prompt, recipe["tokens"], tok if text else None, text, seed=seed)
            kv = self.task.init_text if recipe.get("init") == "kv" else ""
            if method == "p_tuning_v2_classifier":
                return SoftPromptLMClassifier(self.spm, f"{method}-{self.count}", config, self.rows, init_kv_text=kv,
                                              head_lr=recipe.get("head_lr"))
            return SoftPromptLM(self.spm, f"{method}-{self.count}", config, self.rows, init_kv_text=kv)
        if method in ("lora", "full"):
            model = self.models.lm_factory()
            model = baselines.lora(model, r=8) if method == "lora" else baselines.full(model)
            return PlainLM(model, self.rows, method)
        enc_rows = EncoderRows(self.models.encoder_tokenizer)
        model = self.models.encoder_factory()
        if method == "p_tuning_v2_head":
            from ..methods import PTuningV2
            from ..model import SoftPromptModel
            heads = R.ENCODER_HEADS[recipe.get("heads", "classifier")]
            spm = SoftPromptModel(model, trainable_heads=heads)
            init = "zero" if recipe.get("init") == "zero" else "random"
            if recipe.get("reparam") == "mlp":           # the paper's optional reparameterisation (prefix MLP)
                from ..methods import PrefixTuning
                config = PrefixTuning(recipe["tokens"], projection_dim=128, prefix_dropout=0.1, init=init)
            else:
                config = PTuningV2(recipe["tokens"], prefix_dropout=0.1, init=init)
            return SoftPromptEncoder(spm, "v2", config, enc_rows,
                                     heads=heads, pooling=recipe.get("pooling", "cls"), head_lr=recipe.get("head_lr"))
        if method == "full_head":
            return PlainEncoder(baselines.full(model), enc_rows, pooling=recipe.get("pooling", "cls"))
        raise ValueError(f"study: method {method!r} is unknown; expected one of {R.LM_METHODS + R.ENCODER_METHODS}")

    def run_one(self, method: str, recipe: dict, seed: int, splits=("validation", "test")) -> Optional[dict]:
        key = run_key(method, recipe, seed)
        if key in self.done or not self.train:
            return self.done.get(key)
        run = self._train_and_score(method, recipe, seed, splits)
        self.done[key] = run
        if self.on_run is not None:
            self.on_run(key, run)
        return run

    def _train_and_score(self, method: str, recipe: dict, seed: int, splits) -> dict:
        encoder = method in R.ENCODER_METHODS
        steps = self.cfg.encoder_steps if encoder else self.cfg.steps
        batch = self.cfg.encoder_batch_size if encoder else self.cfg.batch_size
        self.log(f"{R.LABELS[method]}: seed {seed}, {steps} steps x {batch}, recipe {recipe}")
        learner = self.learner(method, recipe, seed)
        try:
            stats = train(learner, self.task.train, steps, batch, recipe["lr"], recipe["warmup"], seed,
                          log=self.log)
            out = {"method": method, "seed": seed, "recipe": recipe, **stats,
                   "storage_bytes": learner.storage_bytes()}
            for split in splits:
                start = time.perf_counter()
                out[split] = evaluate(learner, getattr(self.task, split), self.cfg.eval_batch_size)
                out[split]["seconds"] = time.perf_counter() - start
            self.log("  -> " + ", ".join(f"{s} {out[s]['accuracy']:.3f}" for s in splits)
                     + f" (step {stats['step_seconds']:.2f} s)")
            return out
        finally:
            learner.close()
            del learner
            gc.collect()

    def choose(self, method: str) -> Tuple[Optional[dict], List[dict]]:
        """Sweep on validation with the first seed: the chosen recipe's run and the sweep's record."""
        sweep, best = [], None
        for recipe in R.variants(method, self.cfg.sweep):
            run = self.run_one(method, recipe, self.cfg.seeds[0])
            if run is None:
                continue
            sweep.append({"recipe": recipe, "validation": run["validation"]["accuracy"],
                          "step_seconds": run["step_seconds"]})
            if best is None or run["validation"]["accuracy"] > best["validation"]["accuracy"]:
                best = run
        return best, sweep

    def method(self, method: str) -> Optional[dict]:
        """The chosen recipe over every seed, summarised (the first seed's run is the sweep's)."""
        best, sweep = self.choose(method)
        if best is None:
            return None
        runs = [best] + [r for s in self.cfg.seeds[1:] if (r := self.run_one(method, best["recipe"], s)) is not None]
        n = runs[0]["test"]["n"]
        return {"method": method, "label": R.LABELS[method], "soft": method in R.SOFT,
                "model": self.models.encoder_name if method in R.ENCODER_METHODS else self.models.lm_name,
                "recipe": best["recipe"], "sweep": sweep, "runs": runs,
                "test": summarize([r["test"]["accuracy"] for r in runs], n),
                "validation": summarize([r["validation"]["accuracy"] for r in runs], runs[0]["validation"]["n"]),
                "trainable_params": runs[0]["trainable_params"],
                "step_seconds": sorted(r["step_seconds"] for r in runs)[len(runs) // 2],
                "train_memory_mb": runs[0]["train_memory_mb"], "storage_bytes": runs[0]["storage_bytes"]}


def run_key(method: str, recipe: dict, seed: int) -> str:
    return f"{method}|{json.dumps(recipe, sort_keys=True)}|{seed}"


def verdicts(methods: Dict[str, dict], hard: Optional[dict], lm_name: str) -> List[dict]:
    """Per model: the best soft method (by mean test accuracy) against full fine-tuning (target: within 2
    points) and against the validation-selected hand-written prompt (target: above it)."""
    out = []
    for model in dict.fromkeys(m["model"] for m in methods.values()):
        mine = [m for m in methods.values() if m["model"] == model]
        soft = [m for m in mine if m["soft"]]
        full = [m for m in mine if m["method"] in ("full", "full_head")]
        if not soft:
            continue
        best = max(soft, key=lambda m: m["test"]["mean"])
        v = {"model": model, "best_soft": best["label"], "best_soft_accuracy": best["test"]["mean"]}
        if full:
            gap = full[0]["test"]["mean"] - best["test"]["mean"]
            v.update(full_accuracy=full[0]["test"]["mean"], gap_to_full_points=100 * gap,
                     within_2_points_of_full=bool(gap <= 0.02))
        if hard is not None and model == lm_name:
            h = hard["prompts"][hard["selected"]]["test"]["accuracy"]
            v.update(hard_prompt=hard["selected"], hard_accuracy=h, above_hard_prompt=bool(best["test"]["mean"] > h))
        out.append(v)
    return out


def run_study(cfg: StudyConfig, models: Models, task, audit: dict, log: Callable[[str], None] = print,
              done: Optional[Dict[str, dict]] = None, on_run=None, on_progress=None, train: bool = True) -> dict:
    """Run the whole study; returns the JSON-ready result (see :mod:`.report` for the table).

    Order: hand-written prompts; per model (the cheap encoder first) each method's sweep and first seed,
    then the other seeds; so a run cut short has every method once (``done`` resumes it).
    ``on_progress(result)`` gets the result so far (``complete`` False) after each method.
    ``train=False``: summarise the finished runs in ``done`` only (methods without one are left out)."""
    clock = time.perf_counter()
    runner = Runner(cfg, models, task, log, done=done, on_run=on_run, train=train)
    hard = runner.done.get("hard_prompts")
    if hard is None and cfg.lm_methods and cfg.hard_prompts and train:
        hard = runner.hard_prompts()
        if on_run is not None:
            on_run("hard_prompts", hard)
    methods: Dict[str, dict] = {}

    def result(complete: bool) -> dict:
        return {"complete": complete, "config": asdict(cfg),
                "models": {"lm": models.lm_name, "encoder": models.encoder_name},
                "task": {"name": task.name, "description": task.description, "labels": list(task.labels),
                         "row": task.soft_row, "instruction": task.init_text},
                "splits": audit, "hard_prompts": hard, "methods": dict(methods),
                "verdicts": verdicts(methods, hard, models.lm_name),
                "seconds": time.perf_counter() - clock, "threads": torch.get_num_threads()}

    def finish(m: str) -> None:
        summary = runner.method(m)
        if summary is not None:
            methods[m] = summary
        if on_progress is not None:
            on_progress(result(False))

    encoder = tuple(cfg.encoder_methods) if models.encoder_factory is not None else ()
    for group in (encoder, tuple(cfg.lm_methods)):
        for m in group:
            runner.choose(m)
        for m in group:
            finish(m)
    everything = len(methods) == len(cfg.lm_methods) + len(encoder)
    return result(everything and all(m["test"]["seeds"] == len(cfg.seeds) for m in methods.values()))
