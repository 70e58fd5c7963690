"""`python -m mgrpo ...` (what torchrun launches: torchrun --nproc_per_node=8 -m mgrpo train ...)."""
import sys

from .commands import main

sys.exit(main())
