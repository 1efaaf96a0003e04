"""`python -m imagegraph` is the `imagegraph` command."""

from imagegraph.cli import main

main()
