"""``python -m portattn.bench``: the bench's command line (:func:`portattn.bench.cli.main`)."""

import sys

from portattn.bench.cli import main

sys.exit(main())
