"""`python -m poltergust` is the `poltergust` command."""
import sys

from .cli import main

sys.exit(main())
