"""`python -m tfl ...`: the tfl command line."""

from tfl.cli import main

main()
