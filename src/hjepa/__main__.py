import sys

from hjepa.cli import main

sys.exit(main())
