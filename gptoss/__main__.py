"""`python -m gptoss` (and `torchrun ... -m gptoss generate ...`): the `gptoss` command."""

import sys

from gptoss.cli import main

sys.exit(main())
