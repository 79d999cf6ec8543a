"""`python -m poltergust` is the `poltergust` command."""
import sys

from poltergust.cli import main

sys.exit(main())
