"""Flask integration: one session scope per request, as an extension.

::

    from sessionscope.flask import SessionScope

    db = SessionScope()

    def create_app() -> Flask:
        app = Flask(__name__)
        db.init_app(app)              # right after creating the app
        return app

    @app.post("/users")
    def create_user():
        db.session.add(User(name=request.json["name"]))
        return {}, 201                # COMMIT runs before the response is sent

How a request's scope behaves:

- It is opened before the view runs (``before_request``) and ended in
  ``after_request``, which Flask runs before the response goes to the WSGI
  server: COMMIT if the response's status is below ``rollback_from_status``
  (400), ROLLBACK otherwise. Flask has turned exceptions into responses by then
  (``abort(404)``, your error handlers): a 4xx rolls back quietly, counted as
  rolled back, not failed; an unhandled exception (reported through
  ``got_request_exception``) rolls back and counts as failed.
- A failed COMMIT raises out of ``after_request``: Flask answers 500, never a
  2xx (or what your ``errorhandler(500)`` returns: the COMMIT error is its
  ``original_exception``). ``teardown_request`` runs too late for
  that (the status is already decided), so there it only ends a scope that was
  not ended yet, with a ROLLBACK.
- Decorated functions called during the request join its session; so does
  sync code the view runs in threads started with a copy of its context
  (``contextvars.copy_context().run``).
- Outside a request, inside an application context (a CLI command, a shell),
  :attr:`SessionScope.session` opens a scope for that context, committed when it
  ends without an exception (``teardown_appcontext``).
- A streamed response body runs after the scope ended: open a scope of its own
  in the generator.

Views are sync (``async def`` views run in another event loop and thread; use
``async_session_scope()`` there). The package root never imports this module.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from ._extras import missing_extra
from ._manager import SessionManager
from ._request import SyncRequestScope, check_options, manager_getter

try:
    from flask import (
        Flask,
        Response,
        g,
        got_request_exception,
        has_app_context,
        has_request_context,
    )
except ImportError as err:
    raise missing_extra("sessionscope.flask", "flask", err) from err

__all__ = ["SessionScope"]

_REQUEST = "_sessionscope_request"  # g attribute: {extension id: _Open} for the request
_APP = "_sessionscope_app_context"  # g attribute: {extension id: _Open} outside requests


class _Open:
    __slots__ = ("error", "scope", "session")

    def __init__(self, scope: SyncRequestScope, session: Session) -> None:
        self.scope = scope
        self.session = session
        self.error: BaseException | None = None


class SessionScope:
    """A Flask extension giving each request a session scope of ``manager`` (the
    default manager, looked up per request, if None).

    ``overrides`` are scope options (``read_only=True``, ...), validated now.
    One extension object can serve several applications (``init_app`` per app,
    each with its own ``manager`` if given); two extension objects on one app
    (two databases) give a request two sessions.
    """

    def __init__(
        self,
        app: Flask | None = None,
        manager: SessionManager | None = None,
        *,
        rollback_from_status: int = 400,
        **overrides: Any,
    ) -> None:
        check_options(overrides)
        manager_getter(manager)  # type check now
        self._manager = manager
        self._rollback_from_status = rollback_from_status
        self._overrides = overrides
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, manager: SessionManager | None = None) -> None:
        """Register the request hooks on ``app``; ``manager`` replaces the
        extension's manager for this app."""
        getters = app.extensions.setdefault("sessionscope", {})
        getters[id(self)] = manager_getter(manager if manager is not None else self._manager)
        app.before_request(self._open_request)
        app.after_request(self._end_request)
        app.teardown_request(self._teardown_request)
        app.teardown_appcontext(self._teardown_app_context)
        got_request_exception.connect(self._record_error, app, weak=False)

    @property
    def manager(self) -> SessionManager:
        """The manager serving the current application."""
        from flask import current_app

        try:
            getter = current_app.extensions["sessionscope"][id(self)]
        except KeyError:
            raise RuntimeError(
                "this SessionScope was not initialised on the current application: "
                "call init_app(app)"
            ) from None
        manager: SessionManager = getter()
        return manager

    @property
    def session(self) -> Session:
        """The current request's ``Session``; outside a request, inside an
        application context, the context's own ``Session`` (opened on first use).

        Raises ``RuntimeError`` outside an application context, or in a request
        whose scope has already ended (in ``teardown_request``, in a streamed
        body).
        """
        if not has_app_context():
            raise RuntimeError(
                "SessionScope.session needs an application context: use it in a "
                "request, or inside `with app.app_context():`"
            )
        opened = _opened(_REQUEST).get(id(self))
        if opened is not None:
            return opened.session
        if has_request_context():
            raise RuntimeError(
                "no sessionscope session for this request: its scope has ended (a "
                "streamed body or a teardown function runs after the response was "
                "made) or init_app() ran after the request started; open "
                "session_scope() there instead"
            )
        opened = _opened(_APP).get(id(self))
        if opened is None:
            scope = SyncRequestScope(self.manager, self._overrides)
            opened = _opened(_APP)[id(self)] = _Open(scope, scope.open())
        return opened.session

    # -- hooks ----------------------------------------------------------------------

    def _open_request(self) -> None:
        scope = SyncRequestScope(self.manager, self._overrides)
        _opened(_REQUEST)[id(self)] = _Open(scope, scope.open())

    def _end_request(self, response: Response) -> Response:
        opened = _opened(_REQUEST).pop(id(self), None)
        if opened is not None:
            if opened.error is not None:
                opened.scope.close(opened.error)
            else:
                # Raises a failed COMMIT: Flask turns it into a 500 response.
                opened.scope.close(rollback=response.status_code >= self._rollback_from_status)
        return response

    def _record_error(self, sender: Flask, exception: BaseException, **extra: Any) -> None:
        opened = _opened(_REQUEST).get(id(self))
        if opened is not None:
            opened.error = exception

    def _teardown_request(self, exc: BaseException | None) -> None:
        opened = _opened(_REQUEST).pop(id(self), None)
        if opened is None:
            return
        # after_request did not run (the error propagated, or another after_request
        # function failed first): the response was not one to commit.
        error = exc if exc is not None else opened.error
        if error is not None:
            opened.scope.close(error)
        else:
            opened.scope.close(rollback=True)

    def _teardown_app_context(self, exc: BaseException | None) -> None:
        opened = _opened(_APP).pop(id(self), None)
        if opened is not None:
            opened.scope.close(exc)


def _opened(name: str) -> dict[int, _Open]:
    found: dict[int, _Open] | None = g.get(name)
    if found is None:
        found = {}
        setattr(g, name, found)
    return found
