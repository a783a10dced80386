import sys

from dmdcopy.cli import main

sys.exit(main())
