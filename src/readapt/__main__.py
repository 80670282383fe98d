"""`python -m readapt` (also what `accelerate launch -m readapt` runs)."""

import sys

from readapt.cli import main

sys.exit(main())
