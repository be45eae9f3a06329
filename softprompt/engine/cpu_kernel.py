"""Whether the CPU decoder's attention can run on the ``compiled`` backend here: :func:`load`
(the op, or None) and :func:`unavailable_reason`, from :mod:`softprompt.kernels.compiled_build`."""
from softprompt.kernels.compiled_build import load, unavailable_reason

__all__ = ["load", "unavailable_reason"]
