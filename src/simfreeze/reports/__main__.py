"""``python -m simfreeze.reports <sweep dir>``: summarise a sweep directory again by hand; exits 1
when a job failed."""

import sys

from simfreeze.reports.sweep import main

sys.exit(main())
