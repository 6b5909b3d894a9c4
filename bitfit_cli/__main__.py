import sys

from bitfit_cli.main import main

sys.exit(main())
