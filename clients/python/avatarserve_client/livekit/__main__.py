"""python -m avatarserve_client.livekit worker ... (see worker.py)."""

import sys

from .worker import main

sys.exit(main())
