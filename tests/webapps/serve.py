"""``python -m tests.webapps.serve FRAMEWORK FD``: serve a framework's test
application, wrapped in the tests/web.py harness, on the listening socket FD,
with the default manager on the database ``SS_WEB_URL``."""

from __future__ import annotations

import importlib
import os
import socket
import sys

import sessionscope

from ..web import ASGIHarness, WSGIHarness


def main() -> None:
    framework, fd = sys.argv[1], int(sys.argv[2])
    sessionscope.setup_database_connection(os.environ["SS_WEB_URL"])
    module = importlib.import_module(f"tests.webapps.{framework}_app")
    sock = socket.socket(fileno=fd)
    if framework == "flask":
        import waitress

        app = module.create()
        app.wsgi_app = WSGIHarness(app.wsgi_app)
        waitress.serve(app, sockets=[sock], threads=8)
        return
    import uvicorn

    uvicorn.run(ASGIHarness(module.create()), fd=sock.fileno(), log_level="warning")


if __name__ == "__main__":
    main()
