"""`python -m attnscope ...`: the same command line as `attnscope ...`."""
import sys

from .cli import main

sys.exit(main())
