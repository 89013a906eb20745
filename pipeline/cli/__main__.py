"""`python -m pipeline.cli`: the same command as `pipeline`."""
from pipeline.cli.main import main

main()
