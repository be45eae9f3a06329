"""``python -m softprompt.server ...`` = ``softprompt serve ...``."""
import sys

from .cli import main

sys.exit(main())
