"""`python -m async_registrar`: the command line."""

import sys

from ._entrypoint import main

sys.exit(main())
