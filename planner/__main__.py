"""`python -m planner`: the command line (`planner.cli.main`)."""

from planner.cli import main

main()
