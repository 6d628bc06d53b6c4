"""`python -m seqrec ...` (used by torchrun: `torchrun --nproc-per-node N -m seqrec train ...`)."""

import sys

from seqrec.cli import main

sys.exit(main())
