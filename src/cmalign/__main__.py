import sys

from cmalign.cli import main

sys.exit(main())
