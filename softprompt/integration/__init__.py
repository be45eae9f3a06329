"""Drop-in transformers integration: ``attach(model)`` routes attention through the prefix kernels.

Modules: ``families`` (supported families and their facts), ``positions`` (RoPE rotation and
learned-position offsets), ``store`` (``ModelPrefixStore``: cache-convention add/get),
``attention`` (the registered attention and mask functions), ``attach`` (attach/detach).
"""
from .attach import attach, attached_store, detach
from .attention import ATTN_NAME
from .families import SUPPORTED_FAMILIES
from .store import ModelPrefixStore

__all__ = ["attach", "detach", "attached_store", "ModelPrefixStore", "SUPPORTED_FAMILIES", "ATTN_NAME"]
