"""`python -m gpujobs`: the same CLI as the `gpujobs` command."""

from gpujobs.cli import main

main()
