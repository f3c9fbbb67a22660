"""``python -m flows.cli``: the same command line as the ``mocoplus`` script (torchrun and tests start it so)."""

from flows.cli.main import main

main()
