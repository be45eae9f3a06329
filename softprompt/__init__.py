"""softprompt: soft prompts (prefix tuning, P-tuning v1/v2, prompt tuning) with prefix attention kernels."""
__version__ = "0.1.0"

from .store import PrefixStore
from .integration import attach, detach

__all__ = ["PrefixStore", "attach", "detach", "__version__"]
