"""softprompt: soft prompts (prefix tuning, P-tuning v1/v2, prompt tuning) with prefix attention kernels."""
__version__ = "0.1.0"

from .store import PrefixStore
from .integration import attach, detach
from .engine import Engine, SamplingParams

__all__ = ["PrefixStore", "attach", "detach", "__version__"]
__all__ += ["Engine", "SamplingParams"]
from .methods import PrefixTuning, PTuningV2, PromptTuning, PTuningV1
from .model import SoftPromptModel

__all__ += ["SoftPromptModel", "PrefixTuning", "PTuningV2", "PromptTuning", "PTuningV1"]
