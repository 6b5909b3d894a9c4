"""Route dependencies: the task service, the settings and the admin check, as annotated aliases."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from server.errors import AdminDisabled, NotReady, Unauthorized
from server.service import TaskService
from server.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_service(request: Request) -> TaskService:
    service = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        raise NotReady("the server is starting (loading the backbone and tasks) or stopping; retry shortly")
    return service


def require_admin(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    expected = settings.token()
    if expected is None:
        raise AdminDisabled()
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise Unauthorized("admin calls need 'Authorization: Bearer <token>' with the server's BITFIT_ADMIN_TOKEN")


ServiceDep = Annotated[TaskService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
Admin = Depends(require_admin)
