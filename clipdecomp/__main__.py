import sys

from clipdecomp.cli import main

sys.exit(main())
