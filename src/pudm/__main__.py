import sys

from pudm.cli import main

sys.exit(main())
