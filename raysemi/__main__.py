import sys

from raysemi.cli import main

sys.exit(main())
