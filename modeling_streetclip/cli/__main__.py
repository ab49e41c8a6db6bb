"""`python -m modeling_streetclip.cli`, the same as the `streetclip` command (and what `accelerate launch -m` runs)."""

import sys

from . import main


sys.exit(main())
