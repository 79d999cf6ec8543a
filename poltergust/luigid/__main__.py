"""`python -m poltergust.luigid`: luigid with the pipelines' one rule (see `server`)."""
from poltergust.luigid.server import main

main()
