"""python -m avatarserve_client.livekit worker ... (see worker.py)."""

import logging
import os
import sys

from .worker import main

code = main()
# Exit without the interpreter's shutdown: the LiveKit SDK's native runtime keeps worker threads that can call back
# into Python while it finalizes, and such a call aborts the process (a Rust panic that cannot unwind: SIGABRT
# instead of our exit status, about 1 in 30 failed connects here). The room is already left and the session closed;
# only our own output is left to flush.
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
