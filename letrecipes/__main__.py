import sys

from letrecipes.cli import main

sys.exit(main())
