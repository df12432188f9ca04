"""FastAPI dependencies: the runtime, and bearer-token checks for mutating (and optionally
read) routes. All ``async def``: a sync dependency would hop to the thread pool."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.common.settings import ApiSettings, Settings
from services.query.problems import Problem
from services.query.runtime import QueryRuntime

bearer = HTTPBearer(auto_error=False, description="SCOREMESH_API_TOKEN of the server")


async def get_runtime(request: Request) -> QueryRuntime:
    runtime: QueryRuntime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise Problem(503, "not-ready", "the service is starting; retry in a moment")
    return runtime


Runtime = Annotated[QueryRuntime, Depends(get_runtime)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _check_token(request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
    settings: Settings = request.app.state.settings
    configured = settings.api.token
    if configured is None or not configured.get_secret_value():
        raise Problem(
            403,
            "mutations-disabled",
            "this server has no API token configured, so routes that change models are "
            "disabled; set SCOREMESH_API_TOKEN on the server to enable them",
        )
    challenge = {"WWW-Authenticate": 'Bearer realm="scoremesh"'}
    if credentials is None:
        raise Problem(
            401,
            "unauthorized",
            "send the API token as 'Authorization: Bearer <token>'",
            headers=challenge,
        )
    if not hmac.compare_digest(
        credentials.credentials.encode(), configured.get_secret_value().encode()
    ):
        raise Problem(401, "unauthorized", "the bearer token is wrong", headers=challenge)


async def require_token(request: Request, credentials: Credentials) -> None:
    """Mutating routes: need the configured token; with none configured they are off."""
    _check_token(request, credentials)


async def read_access(request: Request) -> None:
    """Read routes: open unless the server requires the token for reads too."""
    config: ApiSettings = request.app.state.config
    if config.require_token_for_reads:
        _check_token(request, await bearer(request))


MutationAuth = Depends(require_token)
ReadAuth = Depends(read_access)
