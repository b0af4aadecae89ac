"""``python -m jquant``: the ``jquant`` command line (:mod:`jquant.cli`)."""

import sys

from jquant.cli import main

sys.exit(main())
