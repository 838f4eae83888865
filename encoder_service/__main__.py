import sys

from encoder_service.cli import main

sys.exit(main())
