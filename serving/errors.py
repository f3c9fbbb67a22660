"""Every failure as one JSON shape, ``{"error": "<one line>"}``: ours, the framework's, and bugs.

A `RequestError` keeps its status (503 adds ``Retry-After``); unknown routes
and methods are 404/405 naming the request; validation errors name the first
field; an index's refusal of a search parameter is a 422 without server paths;
a bug is a 500 whose details stay in the server log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from artifacts.index_bundle import IndexBundleError
from serving.payloads import RequestError, shorten
from serving.protocol import RETRY_AFTER_SECONDS

log = logging.getLogger("uvicorn.error")


def error_response(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one shape of every failure: ``{"error": "<one line>"}``."""
    return JSONResponse({"error": " ".join(reason.split())}, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI, without_paths: Callable[[str], str]) -> None:
    """Every failure as `error_response`: ours, the framework's (404, 405, validation), and bugs (500)."""

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, error: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if error.status == 503 else {}
        if error.close:
            headers["Connection"] = "close"
        return error_response(error.status, error.reason, headers)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, error: ClientDisconnect) -> Response:
        # the client went away before its body was read: one log line, not a traceback; nobody reads an answer
        log.info("%s %s: the client disconnected before sending its whole body", request.method, request.url.path)
        return Response(status_code=400, headers={"Connection": "close"})

    @app.exception_handler(IndexBundleError)
    async def bad_search_parameter(request: Request, error: IndexBundleError) -> JSONResponse:
        return error_response(422, without_paths(str(error)))

    @app.exception_handler(HTTPException)
    async def framework_error(request: Request, error: HTTPException) -> JSONResponse:
        where = f"{request.method} {shorten(request.url.path)}"
        reasons = {404: f"not found: {where}", 405: f"method not allowed: {where}"}
        return error_response(error.status_code, reasons.get(error.status_code, str(error.detail)), error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response(422, f"invalid request: {where} {shorten(str(first.get('msg', '')))}".strip())

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception) -> JSONResponse:
        # Starlette logs the traceback after this answer; the client gets no internals
        return error_response(500, "internal server error; the server log has the details")
