"""bitfit-serve as a Ray Serve application: the same FastAPI app (`server.http.app.create_app`) in every replica.

    serve run server.ray_app:build store=s3://BUCKET/PREFIX replicas=2     (plus any server setting, key=value)
    serve run deploy/ray/serve.yaml                                        (autoscaling; docs/deploy.md, "Ray")

Each replica is one Ray actor that does what one `bitfit serve` process does: it loads the backbone once, opens
the store and serves every task from its bank, and polls the store for changes. Replicas share nothing but the
store (s3:// when they run on more than one machine), so an admin call through Ray's proxy lands in any one
replica, goes to the store, and reaches the others by their next poll; a replica that Ray replaces reloads
everything from the store. Settings not given here come from BITFIT_* variables in the replica's environment
(the admin token belongs there, not on a command line), S3 settings from the standard AWS_* variables.

Ray's proxy routes each request to the less loaded of two replicas. With `multiplex=true` it routes by task
instead (Serve's model multiplexing: clients send the `serve_multiplexed_model_id` header set to the task), so a
replica's batches tend to hold one task; BENCHMARKS.md ("Scale-out") measures whether that pays.

Every answer carries `X-Bitfit-Replica` (the replica's actor name) and `X-Bitfit-Node` (its Ray node), so a
client can tell which replica answered.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from server.settings import Settings

DEPLOYMENT = "BitfitServe"  # the name deploy/ray/serve.yaml and the RayService refer to


class RayOptions(BaseModel):
    """The build arguments that shape the deployment; every other argument is a server setting."""

    model_config = ConfigDict(extra="forbid")

    replicas: int | Literal["auto"] | None = Field(
        None, description="replicas (an integer), or 'auto' for Ray's default autoscaling; unset: 1, or what a "
        "config file's autoscaling_config says")
    num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each replica (also its torch threads)")
    num_gpus: float = Field(0, ge=0, description="GPUs Ray reserves for each replica (with device=cuda: 1)")
    max_ongoing_requests: int = Field(32, ge=1, description="requests one replica takes at once; more wait in "
                                      "the proxy (Ray's default of 5 would leave the batcher little to batch)")
    health_check_period_s: float | None = Field(None, gt=0, description="how often Ray checks each replica "
                                                "(Ray's default: 10 s)")
    multiplex: bool = Field(False, description="route requests by task (the serve_multiplexed_model_id header)")
    multiplex_tasks: int = Field(64, ge=1, description="with multiplex: tasks Ray's router ties to one replica; "
                                 "a replica still serves every task, this only steers routing")


PROXY_KEYS = ("host", "port")  # Ray's proxy listens, not the replicas


def _problems(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'settings'}: {e['msg']}" for e in error.errors())


def split_args(args: dict[str, Any]) -> tuple[RayOptions, dict[str, Any]]:
    """(deployment options, server settings) from `serve run` arguments; ValueError naming what is wrong."""
    ray_keys, setting_keys = set(RayOptions.model_fields), set(Settings.model_fields) - set(PROXY_KEYS)
    proxy = sorted(set(args) & set(PROXY_KEYS))
    if proxy:
        raise ValueError(f"server.ray_app:build: {proxy} belong to Ray's proxy, not to a replica: set them with "
                         "`serve start --http-host H --http-port P` or http_options in a Serve config file")
    unknown = sorted(set(args) - ray_keys - setting_keys)
    if unknown:
        raise ValueError(f"server.ray_app:build: unknown argument(s) {unknown}; the deployment takes "
                         f"{sorted(ray_keys)}, the server its settings {sorted(setting_keys)}")
    try:
        options = RayOptions(**{k: v for k, v in args.items() if k in ray_keys})
    except ValidationError as e:
        raise ValueError(f"server.ray_app:build: {_problems(e)}") from None
    given = {k: v for k, v in args.items() if k not in ray_keys}
    try:
        settings = Settings(**given)  # fail here, at `serve run`, not in every replica
    except ValidationError as e:
        raise ValueError(f"server.ray_app:build: invalid server settings: {_problems(e)}") from None
    if settings.device.startswith("cuda") and not options.num_gpus:
        raise ValueError(f"server.ray_app:build: device={settings.device} needs num_gpus=1 (or a fraction): Ray "
                         "hides every GPU from a replica that reserves none")
    return options, given


def deployment_options(options: RayOptions) -> dict[str, Any]:
    actor = {"num_cpus": options.num_cpus, **({"num_gpus": options.num_gpus} if options.num_gpus else {})}
    out: dict[str, Any] = {"ray_actor_options": actor,
                           "max_ongoing_requests": options.max_ongoing_requests}
    if options.replicas is not None:
        out["num_replicas"] = options.replicas
    if options.health_check_period_s is not None:
        out["health_check_period_s"] = options.health_check_period_s
    return out


class ReplicaHeaders:
    """ASGI middleware: names the replica and node on every answer; with multiplexing, tells Ray's router
    which task this replica just served (through the `@serve.multiplexed` loader)."""

    def __init__(self, app, replica: str, node: str, note_task=None):
        self.app, self.note_task = app, note_task
        self.headers = [(b"x-bitfit-replica", replica.encode()), (b"x-bitfit-node", node.encode())]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.note_task is not None and (task := serve.get_multiplexed_model_id()):
            await self.note_task(task)

        async def named(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        await self.app(scope, receive, named)


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()  # the app is built in each replica (`__serve_build_asgi_app__`), after its constructor
class BitfitServe:
    def __init__(self, given: dict[str, Any], multiplex: bool = False, multiplex_tasks: int = 64):
        self.settings = Settings(**given)
        self.multiplex = multiplex
        if multiplex:
            async def task_model(task: str) -> str:
                # every replica holds every task (the bank is a cache of the store): "loading" one is only
                # bookkeeping for Ray's router, which then prefers this replica for the task
                return task

            self.note_task = serve.multiplexed(max_num_models_per_replica=multiplex_tasks)(task_model)

    def __serve_build_asgi_app__(self):
        import ray

        from server.http.app import create_app

        app = create_app(self.settings)  # its lifespan, run by Serve before traffic, loads backbone and store
        context = ray.get_runtime_context()
        app.add_middleware(ReplicaHeaders, replica=context.get_actor_name() or "?", node=context.get_node_id(),
                           note_task=self.note_task if self.multiplex else None)
        self.state = app.state  # where the lifespan puts the service
        return app

    def check_health(self) -> None:
        """Ray replaces a replica whose model thread has died (it would only ever answer 503)."""
        service = getattr(getattr(self, "state", None), "service", None)
        thread = getattr(service.runner, "_thread", None) if service is not None else None
        if thread is not None and not thread.is_alive():
            raise RuntimeError("the runner's model thread has stopped")


def build(args: dict[str, Any]):
    """The application for `serve run server.ray_app:build key=value ...` (and deploy/ray/serve.yaml's args)."""
    options, given = split_args(dict(args))
    return BitfitServe.options(**deployment_options(options)).bind(given, options.multiplex, options.multiplex_tasks)
