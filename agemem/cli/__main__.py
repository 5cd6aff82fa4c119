"""``python -m agemem.cli``: the same command line as ``agemem``."""

from agemem.cli import main

main()
