"""`python -m switchyard ...`: the same command where the console script is not installed
(for example a checkout on a machine whose Python has the dependencies but not the project)."""

from switchyard.cli import main

main()
