"""``python -m ssrengine.models fetch NAME``: convert an embedded model into the cache."""

import sys

from ssrengine.models.fetch import main

sys.exit(main())
