"""`python -m avatarserve_client stream ...`"""

import sys

from .cli import main

sys.exit(main())
