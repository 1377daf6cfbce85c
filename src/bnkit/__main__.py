"""`python -m bnkit`: the same as the `bnkit` command."""
import sys

from .cli import main

sys.exit(main())
