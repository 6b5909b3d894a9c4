"""The tasks resource: list and inspect (scope read, when reads need a token), upload, activate, roll back and
delete (scope admin:<glob matching the task>). Every change is recorded in the audit log with who made it."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Query, Request

from server.http.deps import AdminCaller, ServiceDep, guarded
from server.http.params import TaskPath, VersionPath
from server.http.schemas import ActivateRequest, Deleted, TaskList, TaskOut, TaskVersion, errors

router = APIRouter(prefix="/tasks", tags=["tasks"])
READ_ERRORS = (401, 403, 503)
ADMIN_ERRORS = (401, 403, 404, 422, 503)
SAFETENSORS_BODY = {
    "requestBody": {
        "required": True,
        "description": "a bias set file (safetensors), as written by `bitfit train`",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.get("", response_model=TaskList, **guarded("read"), responses=errors(*READ_ERRORS))
async def list_tasks(service: ServiceDep) -> TaskList:
    """Every stored task with its versions, the active one, labels and training metrics."""
    return await service.tasks()


@router.get("/{task}", response_model=TaskOut, **guarded("read"), responses=errors(*READ_ERRORS, 404, 422))
async def get_task(task: TaskPath, service: ServiceDep) -> TaskOut:
    return await service.task(task)


@router.put("/{task}", status_code=201, response_model=TaskVersion, responses=errors(*ADMIN_ERRORS, 409, 413),
            **guarded("admin", SAFETENSORS_BODY))
async def upload(
    task: TaskPath,
    request: Request,
    service: ServiceDep,
    caller: AdminCaller,
    activate: bool = Query(True, description="make it the active version at once"),
) -> TaskVersion:
    """Store a new version (validated first: a bad file changes nothing); live for the next batch."""
    info = await service.put(task, await request.body(), activate, asdict(caller))
    return TaskVersion(task=task, version=info.version)


@router.post("/{task}/activate", response_model=TaskVersion, responses=errors(*ADMIN_ERRORS), **guarded("admin"))
async def activate(task: TaskPath, body: ActivateRequest, service: ServiceDep, caller: AdminCaller) -> TaskVersion:
    info = await service.activate(task, body.version, asdict(caller))
    return TaskVersion(task=task, version=info.version)


@router.post("/{task}/rollback", response_model=TaskVersion, responses=errors(*ADMIN_ERRORS, 409), **guarded("admin"))
async def rollback(task: TaskPath, service: ServiceDep, caller: AdminCaller) -> TaskVersion:
    """Make the previously active version active again."""
    info = await service.rollback(task, asdict(caller))
    return TaskVersion(task=task, version=info.version)


@router.delete("/{task}", response_model=Deleted, responses=errors(*ADMIN_ERRORS), **guarded("admin"))
async def delete_task(task: TaskPath, service: ServiceDep, caller: AdminCaller) -> Deleted:
    """Delete the task and all its versions; it stops being served at once."""
    await service.delete_task(task, asdict(caller))
    return Deleted(task=task)


@router.delete("/{task}/versions/{version}", response_model=Deleted, responses=errors(*ADMIN_ERRORS, 409),
               **guarded("admin"))
async def delete_version(
    task: TaskPath,
    version: VersionPath,
    service: ServiceDep,
    caller: AdminCaller,
    force: bool = Query(False, description="also when it is the active version (the previous one takes over)"),
) -> Deleted:
    await service.delete_version(task, version, force, asdict(caller))
    return Deleted(task=task, version=version)
