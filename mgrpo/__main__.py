"""`python -m mgrpo ...` (what torchrun launches: torchrun --nproc_per_node=8 -m mgrpo train ...)."""
from .commands import run_and_exit

run_and_exit()
