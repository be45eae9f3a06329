import sys

from .cli import train_command

sys.exit(train_command())
