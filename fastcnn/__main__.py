"""`python -m fastcnn ...`: the same as the `fastcnn` command."""
import sys

from .cli import main

sys.exit(main())
