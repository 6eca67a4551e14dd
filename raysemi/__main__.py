import sys

from raysemi.commands.cli import main

sys.exit(main())
