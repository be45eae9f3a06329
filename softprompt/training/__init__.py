"""Training soft prompts: many tasks at once, mixed batches, on HF ``Trainer`` (DDP under torchrun).

* :func:`train_tasks` / :class:`TrainConfig`: the Python API;
* :func:`train_command`: the ``softprompt train`` command line (``python -m softprompt.training``);
* :mod:`.data`: examples, the multi-task dataset and the left-padding collator.
"""
from .cli import train_command
from .data import MultiTaskCollator, MultiTaskDataset, tokenize_example
from .trainer import TrainConfig, load_prompts, train_tasks, trainable_parameters

__all__ = ["TrainConfig", "train_tasks", "train_command", "load_prompts", "trainable_parameters",
           "MultiTaskDataset", "MultiTaskCollator", "tokenize_example"]
