import sys

from portattn.cli import main

sys.exit(main())
