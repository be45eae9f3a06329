"""softprompt: soft prompts (prefix tuning, P-tuning v1/v2, prompt tuning) with prefix attention kernels."""
__version__ = "0.1.0"

from .store import PrefixStore

__all__ = ["PrefixStore", "__version__"]
