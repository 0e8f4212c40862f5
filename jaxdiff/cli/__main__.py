import sys

from jaxdiff.cli import entry

sys.exit(entry())
