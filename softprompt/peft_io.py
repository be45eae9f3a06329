"""Interchange with HF PEFT prompt-learning adapters (``adapter_config.json`` +
``adapter_model.safetensors``), without importing PEFT.

PEFT stores, for every prompt-learning method, one tensor ``prompt_embeddings``: the *output* of
its prompt encoder (the reparameterisation MLP / LSTM is not saved):

=================  ==========================  =========================================
PEFT peft_type     prompt_embeddings           loaded here as
=================  ==========================  =========================================
PREFIX_TUNING      ``[P, L*2*kv_width]``        ``PrefixTuning`` (CAUSAL_LM / SEQ_2_SEQ_LM
                   (layer-major, K then V)      task types) or ``PTuningV2`` (NLU task
                                                types), folded (raw K/V rows)
PROMPT_TUNING      ``[P, hidden]``              ``PromptTuning``
P_TUNING           ``[P, hidden]``              ``PTuningV1(encoder="none")`` in front
=================  ==========================  =========================================

Classification adapters also carry their head (``modules_to_save``) as
``base_model.<module>.<param>``; ``load_peft(heads=True)`` copies those into the wrapped model's
modules (heads are shared by all tasks of the model). Any other tensor is refused: an adapter may
never overwrite the frozen base model. Seq2seq adapters (``num_transformer_submodules == 2``) are
refused.

``export_peft`` writes the inverse (``inference_mode: true``; a prefix-tuning MLP is exported
folded, i.e. ``prefix_projection: false``, since PEFT only ever reloads the projected output).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .methods import PrefixTuning, PromptTuning, PTuningV1, PTuningV2
from .methods.checkpoint import _atomic_write
from .methods.template import is_prefix

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY = "prompt_embeddings"
NLU_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def _bad(path, why: str) -> ValueError:
    return ValueError(f"PEFT adapter {str(path)!r} is invalid: {why}")


def _task_type(model) -> str:
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


def read_adapter(path):
    """``(config dict, {name: tensor})`` of a PEFT adapter folder, with format errors as ValueError."""
    from safetensors.torch import load
    path = Path(path)
    cfg_path, w_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise _bad(path, f"{ADAPTER_CONFIG} is missing")
    if not w_path.is_file():
        if (path / "adapter_model.bin").exists():
            raise _bad(path, "only a pickled adapter_model.bin is present; softprompt reads safetensors only")
        raise _bad(path, f"{ADAPTER_WEIGHTS} is missing")
    try:
        config = json.loads(cfg_path.read_bytes().decode())
    except (ValueError, RecursionError) as e:      # UnicodeDecodeError is a ValueError
        raise _bad(cfg_path, f"not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise _bad(cfg_path, f"the config is {type(config).__name__} {config!r:.40}; expected a JSON object")
    try:
        tensors = load(w_path.read_bytes())
    except Exception as e:
        raise _bad(w_path, f"not a readable safetensors file ({e})") from None
    if KEY not in tensors:
        raise _bad(w_path, f"it has no {KEY!r} tensor (found {sorted(tensors)})")
    return config, tensors


def load_peft(spm, path, task: str, method: Optional[str] = None, heads: bool = True):
    """Add task ``task`` to ``spm`` (a SoftPromptModel) from a PEFT prompt-learning adapter folder.

    Args:
        method: for PREFIX_TUNING adapters, "prefix_tuning" or "p_tuning_v2" (default: by task type).
        heads: copy the adapter's head weights (its ``modules_to_save``) into the model.
    Everything is validated before the model or ``spm`` changes.
    """
    config, tensors = read_adapter(path)
    g = spm.geometry
    spm._check_name(task)
    cfg_path = Path(path) / ADAPTER_CONFIG
    peft_type = config.get("peft_type")
    submodules = config.get("num_transformer_submodules", 1)
    if submodules not in (1, None):
        raise _bad(cfg_path, f"`num_transformer_submodules` is {submodules!r}; only 1 is supported (2 means a "
                   "seq2seq adapter, which softprompt does not load)")
    P = config.get("num_virtual_tokens")
    if isinstance(P, bool) or not isinstance(P, int) or P <= 0:
        raise _bad(cfg_path, f"`num_virtual_tokens` {P!r} is invalid; expected a positive int")
    if not tensors[KEY].dtype.is_floating_point:
        raise _bad(path, f"{KEY} has dtype {tensors[KEY].dtype}; expected a floating-point tensor")
    emb = tensors[KEY].float()
    if emb.dim() != 2 or emb.shape[0] != P:
        raise _bad(path, f"{KEY} has shape {tuple(emb.shape)}; expected [num_virtual_tokens={P}, ...]")
    if config.get("num_layers") not in (None, g.num_layers):
        raise ValueError(f"PEFT adapter {str(path)!r} does not fit the model: num_layers {config.get('num_layers')} "
                         f"vs {g.num_layers}")
    if peft_type == "PREFIX_TUNING":
        want = g.num_layers * 2 * g.kv_width
        if emb.shape[1] != want:
            raise ValueError(f"PEFT adapter {str(path)!r} does not fit the model: {KEY} width {emb.shape[1]}; the "
                             f"model needs num_layers*2*kv_heads*head_dim = {g.num_layers}*2*{g.num_kv_heads}*"
                             f"{g.head_dim} = {want}")
        if method is None:
            method = "p_tuning_v2" if config.get("task_type") in NLU_TASKS else "prefix_tuning"
        if method not in ("prefix_tuning", "p_tuning_v2"):
            raise ValueError(f"load_peft: `method` {method!r} is invalid for PREFIX_TUNING; expected "
                             "'prefix_tuning' or 'p_tuning_v2'")
        cfg = PrefixTuning(P) if method == "prefix_tuning" else PTuningV2(P)
    elif peft_type in ("PROMPT_TUNING", "P_TUNING"):
        if emb.shape[1] != g.hidden_size:
            raise ValueError(f"PEFT adapter {str(path)!r} does not fit the model: {KEY} width {emb.shape[1]} "
                             f"vs hidden_size {g.hidden_size}")
        cfg = PromptTuning(P) if peft_type == "PROMPT_TUNING" else PTuningV1(num_virtual_tokens=P, encoder="none")
    else:
        raise _bad(path, f"peft_type {peft_type!r} is not supported; expected PREFIX_TUNING, PROMPT_TUNING or P_TUNING")
    if not torch.isfinite(emb).all():
        raise _bad(path, f"{KEY} contains NaN or inf")
    declared = _declared_heads(path, config, tensors)     # with heads=False too: no undeclared tensors
    head_state = _head_state(spm, path, declared, tensors) if heads else {}
    module = cfg.build(g, None)
    with torch.no_grad():
        module.embedding.weight.copy_(emb)
    for (module_path, param), value in head_state.items():
        with torch.no_grad():
            t = spm.model.get_submodule(module_path).state_dict()[param]
            t.copy_(value.to(t.dtype))
    return spm._add_module(task, module)


def _declared_heads(path, config: dict, tensors: dict) -> dict:
    """``{key: (module path, param)}`` of the adapter's head tensors: those under a module its config
    declares in ``modules_to_save`` (PEFT matches a name or a dotted suffix). Any other tensor would
    overwrite the frozen base model, so it is a ValueError naming the key."""
    declared = config.get("modules_to_save") or []
    if not isinstance(declared, list) or not all(isinstance(d, str) and d for d in declared):
        raise _bad(Path(path) / ADAPTER_CONFIG, f"`modules_to_save` {declared!r:.80} is invalid; expected a list "
                   "of module names or null")
    out = {}
    for key in tensors:
        if key == KEY:
            continue
        name = key[len("base_model."):] if key.startswith("base_model.") else key
        module_path, _, param = name.rpartition(".")
        if not any(module_path == d or module_path.endswith("." + d) for d in declared):
            raise _bad(path, f"tensor {key!r} is neither {KEY!r} nor a parameter of a module in `modules_to_save` "
                       f"{declared}; refusing to overwrite the base model")
        out[key] = (module_path, param)
    return out


def _head_state(spm, path, declared: dict, tensors: dict) -> dict:
    """``{(module path, param): tensor}`` of the declared heads, checked against the model's modules."""
    state = {}
    for key, (module_path, param) in declared.items():
        value = tensors[key]
        try:
            target = spm.model.get_submodule(module_path)
        except AttributeError:
            raise ValueError(f"PEFT adapter {str(path)!r} does not fit the model: it has {key!r} but the model "
                             f"has no module {module_path!r}") from None
        current = target.state_dict().get(param)
        if current is None or tuple(current.shape) != tuple(value.shape):
            raise ValueError(f"PEFT adapter {str(path)!r} does not fit the model: {key!r} has shape "
                             f"{tuple(value.shape)}, the model's {module_path}.{param} "
                             f"{None if current is None else tuple(current.shape)}")
        if value.dtype.is_floating_point and not torch.isfinite(value).all():
            raise _bad(path, f"{key!r} contains NaN or inf")
        state[(module_path, param)] = value
    return state


@torch.no_grad()
def prompt_embeddings(spm, task: str) -> torch.Tensor:
    """What PEFT would save for ``task``: ``[P, L*2*kv_width]`` (deep) or ``[P, hidden]`` (input)."""
    module = spm._module(task)
    with spm._eval_module(module):
        if module.kind == "deep":
            return module.flat().detach().float().clone()
        if not is_prefix(module.template) or any(s[0] == "tokens" for s in module.template):
            raise ValueError(f"export_peft: task {task!r} places soft tokens by a template {module.template}; "
                             "PEFT adapters can only hold soft tokens in front of the input")
        return module.embeddings().detach().float().clone()


def export_peft(spm, task: str, path, base_model_name_or_path: Optional[str] = None) -> None:
    """Write ``task`` as a PEFT adapter folder (loads with ``PeftModel.from_pretrained``)."""
    from safetensors.torch import save
    module = spm._module(task)
    g = spm.geometry
    emb = prompt_embeddings(spm, task)
    task_type = _task_type(spm.model)
    base = base_model_name_or_path or getattr(spm.model.config, "_name_or_path", None) or None
    heads_cfg = getattr(spm.model.config, "num_attention_heads", None)
    config = {"base_model_name_or_path": base, "inference_mode": True, "num_layers": g.num_layers,
              "num_transformer_submodules": 1, "num_virtual_tokens": int(emb.shape[0]), "revision": None,
              "task_type": task_type, "modules_to_save": list(spm.trainable_heads) or None, "auto_mapping": None}
    method = module.config.method
    if module.kind == "deep":
        config.update(peft_type="PREFIX_TUNING", token_dim=g.kv_width, num_attention_heads=g.num_kv_heads,
                      encoder_hidden_size=g.kv_width, prefix_projection=False, init_weights=None)
    elif method == "prompt_tuning":
        config.update(peft_type="PROMPT_TUNING", token_dim=g.hidden_size, num_attention_heads=heads_cfg,
                      prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None,
                      tokenizer_kwargs=None)
    else:
        config.update(peft_type="P_TUNING", token_dim=g.hidden_size, num_attention_heads=heads_cfg,
                      encoder_reparameterization_type="MLP", encoder_hidden_size=g.hidden_size,
                      encoder_num_layers=2, encoder_dropout=0.0)
    tensors = {KEY: emb.contiguous()}
    for head in spm.trainable_heads:
        for k, v in spm.model.get_submodule(head).state_dict().items():
            tensors[f"base_model.{head}.{k}"] = v.detach().cpu().contiguous()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write(path / ADAPTER_WEIGHTS, save(tensors))
    _atomic_write(path / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True).encode())
