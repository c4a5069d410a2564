"""`python -m medtune`, which is also how torchrun launches the training stage."""

from medtune.cli import main

main()
