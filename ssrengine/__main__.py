import sys

from ssrengine.cli import main

sys.exit(main())
