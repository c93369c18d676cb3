"""``python -m aigc`` (what torchrun runs on each rank): the same entry point as the ``aigc`` command."""
from aigc.cli import main

main()
