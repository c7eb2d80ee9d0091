import sys

from bt_fast.cli import main

sys.exit(main())
