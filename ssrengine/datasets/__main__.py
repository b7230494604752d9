"""``python -m ssrengine.datasets``, the earlier name of ``python -m ssrengine.data``."""

import sys

from ssrengine.data.__main__ import main

sys.exit(main())
