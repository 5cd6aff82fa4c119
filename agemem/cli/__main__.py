"""``python -m agemem.cli``: the same as the ``agemem`` command."""

from agemem.cli import main

main()
