"""`python -m modeling_streetclip.cli`, the `streetclip` command (what `accelerate launch -m` runs)."""

import sys

from . import main


sys.exit(main())
