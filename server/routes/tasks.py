"""The tasks resource: list and inspect (open), upload, activate, roll back and delete (admin token)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from server.deps import Admin, ServiceDep
from server.schemas import ActivateRequest, Deleted, TaskList, TaskOut, TaskVersion, errors

router = APIRouter(prefix="/tasks", tags=["tasks"])
ADMIN_ERRORS = (401, 403, 404, 503)
SAFETENSORS_BODY = {
    "requestBody": {
        "required": True,
        "description": "a bias set file (safetensors), as written by `bitfit train`",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.get("", response_model=TaskList)
async def list_tasks(service: ServiceDep) -> TaskList:
    """Every stored task with its versions, the active one, labels and training metrics."""
    return await service.tasks()


@router.get("/{task}", response_model=TaskOut, responses=errors(404))
async def get_task(task: str, service: ServiceDep) -> TaskOut:
    return await service.task(task)


@router.put("/{task}", status_code=201, response_model=TaskVersion, dependencies=[Admin],
            responses=errors(*ADMIN_ERRORS, 409, 413, 422), openapi_extra=SAFETENSORS_BODY)
async def upload(
    task: str,
    request: Request,
    service: ServiceDep,
    activate: bool = Query(True, description="make it the active version at once"),
) -> TaskVersion:
    """Store a new version (validated first: a bad file changes nothing); live for the next batch."""
    info = await service.put(task, await request.body(), activate)
    return TaskVersion(task=task, version=info.version)


@router.post("/{task}/activate", response_model=TaskVersion, dependencies=[Admin], responses=errors(*ADMIN_ERRORS))
async def activate(task: str, body: ActivateRequest, service: ServiceDep) -> TaskVersion:
    info = await service.activate(task, body.version)
    return TaskVersion(task=task, version=info.version)


@router.post("/{task}/rollback", response_model=TaskVersion, dependencies=[Admin],
             responses=errors(*ADMIN_ERRORS, 409))
async def rollback(task: str, service: ServiceDep) -> TaskVersion:
    """Make the previously active version active again."""
    info = await service.rollback(task)
    return TaskVersion(task=task, version=info.version)


@router.delete("/{task}", response_model=Deleted, dependencies=[Admin], responses=errors(*ADMIN_ERRORS))
async def delete_task(task: str, service: ServiceDep) -> Deleted:
    """Delete the task and all its versions; it stops being served at once."""
    await service.delete_task(task)
    return Deleted(task=task)


@router.delete("/{task}/versions/{version}", response_model=Deleted, dependencies=[Admin],
               responses=errors(*ADMIN_ERRORS, 409))
async def delete_version(
    task: str,
    version: str,
    service: ServiceDep,
    force: bool = Query(False, description="also when it is the active version (the previous one takes over)"),
) -> Deleted:
    await service.delete_version(task, version, force)
    return Deleted(task=task, version=version)
