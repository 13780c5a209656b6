import sys

from vlmscope.cli import main

sys.exit(main())
