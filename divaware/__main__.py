"""``python -m divaware ...`` (and ``torchrun ... -m divaware train ...``): the ``divaware`` command."""

import sys

from divaware.cli import main

sys.exit(main())
