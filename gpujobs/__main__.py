"""`python -m gpujobs`: the same CLI as the `gpujobs` command."""

from gpujobs.cli.main import main

main()
