"""Talk to an avatar from a browser: a web page and a WebRTC bridge into an AvatarServe session.

    avatarserve-web --server HOST:PORT [--host 127.0.0.1] [--port 8080]    # or: avatarserve web ...

Needs the `web` extra: pip install 'avatarserve-client[web]' (aiortc, aiohttp).
"""

from .app import WebServer, add_web_arguments, create_app, main, run_web

__all__ = ["WebServer", "add_web_arguments", "create_app", "main", "run_web"]
