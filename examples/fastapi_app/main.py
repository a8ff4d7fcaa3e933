"""The example application: ``uvicorn main:app`` from this directory.

Without ``DATABASE_URL`` it uses the SQLite file ``sessionscope.db`` in the
working directory; set ``DATABASE_URL=postgresql://...`` (or ``mysql://...``)
for a server database.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError

from db.base import create_tables, setup_database_connection
from routes import profiles, stats, users
from services import NotFoundError, RejectedError


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    manager = setup_database_connection()
    await create_tables(manager)
    yield
    await manager.adispose()


app = FastAPI(title="sessionscope example", lifespan=lifespan)
app.include_router(users.router)
app.include_router(profiles.router)
app.include_router(stats.router)


@app.exception_handler(NotFoundError)
async def not_found(request: Request, exc: NotFoundError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


@app.exception_handler(RejectedError)
async def rejected(request: Request, exc: RejectedError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=422)


@app.exception_handler(IntegrityError)
async def conflict(request: Request, exc: IntegrityError) -> JSONResponse:
    # Raised at flush or COMMIT, before the response: the transaction was rolled
    # back. The message holds SQL and parameters: do not echo it to the client.
    return JSONResponse({"detail": "conflicts with existing data"}, status_code=409)
