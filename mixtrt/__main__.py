"""`python -m mixtrt ...` is the `mixtrt` command."""

import sys

from mixtrt.cli import main

sys.exit(main())
