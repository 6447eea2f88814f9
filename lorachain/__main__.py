import sys

from lorachain.cli import main

sys.exit(main())
