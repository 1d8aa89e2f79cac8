"""Test-wide setup. The Triton interpreter must be selected before any kernel
module is imported, so it is set here (tests may read/set the environment;
library code never does)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
