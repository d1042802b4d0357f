"""`python -m bench.efficacy`: see bench/efficacy/testbed.py."""

import sys

from bench.efficacy.testbed import main

sys.exit(main())
