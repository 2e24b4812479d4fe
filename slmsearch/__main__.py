"""`python -m slmsearch` runs the command line."""

from slmsearch.cli import main

main()
