"""`python -m fxpress.cli` is the `fxpress` command."""
import sys

from fxpress.cli import main

sys.exit(main())
