"""``python -m m2rec ...`` = the ``m2rec`` command."""
import sys

from .cli import main

sys.exit(main())
