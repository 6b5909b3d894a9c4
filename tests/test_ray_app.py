"""`server.ray_app:build`, the Ray Serve application builder, without a cluster: which `serve run` arguments shape
the deployment, which are server settings, and the clear errors for the rest (test_ray_cluster.py runs it on a
real two-node cluster)."""

from __future__ import annotations

import warnings

import pytest

with warnings.catch_warnings():  # Ray's own pydantic models warn about their use of pydantic: nothing to act on
    warnings.simplefilter("ignore", DeprecationWarning)
    from server.ray_app import DEPLOYMENT, build, deployment_options, split_args


def test_build_passes_server_settings_to_each_replica_and_shapes_the_deployment():
    app = build({"store": "s3://team-bucket/bitfit", "replicas": "3", "max_batch": "16", "num_cpus": "2"})
    deployment = app._bound_deployment
    assert deployment.name == DEPLOYMENT
    assert deployment.num_replicas == 3
    assert deployment.ray_actor_options["num_cpus"] == 2.0
    given, multiplex, _ = deployment.init_args
    assert given == {"store": "s3://team-bucket/bitfit", "max_batch": "16"} and multiplex is False


@pytest.mark.parametrize("args, options", [
    ({}, {"ray_actor_options": {"num_cpus": 1.0}, "max_ongoing_requests": 32}),
    ({"replicas": "auto"}, {"num_replicas": "auto"}),
    ({"replicas": "2", "health_check_period_s": "1"}, {"num_replicas": 2, "health_check_period_s": 1.0}),
    ({"device": "cuda", "num_gpus": "1"}, {"ray_actor_options": {"num_cpus": 1.0, "num_gpus": 1.0}}),
], ids=["defaults: Ray's replica count or the config file's autoscaling", "Ray's autoscaling", "fixed replicas",
        "a GPU per replica"])
def test_deployment_options_from_the_arguments(args, options):
    got = deployment_options(split_args(args)[0])
    assert options.items() <= got.items()
    if "replicas" not in args:
        assert "num_replicas" not in got  # so a config file's autoscaling_config is not overridden


@pytest.mark.parametrize("args, message", [
    ({"stroe": "s3://b/p"}, "unknown argument(s) ['stroe']"),
    ({"replicas": "two"}, "replicas"),
    ({"num_cpus": "0"}, "num_cpus"),
    ({"port": "9000"}, "belong to Ray's proxy"),
    ({"dtype": "float16"}, "dtype float16 needs a GPU"),
    ({"max_inputs": "5000", "max_queued": "10"}, "max_inputs (5000) exceeds max_queued"),
    ({"device": "cuda"}, "needs num_gpus=1"),
], ids=["misspelt key", "replicas not a number", "no CPUs", "a proxy setting", "invalid setting",
        "settings that contradict", "a GPU without reserving one"])
def test_bad_arguments_are_refused_at_build_naming_what_to_fix(args, message):
    with pytest.raises(ValueError, match="server.ray_app:build") as e:
        build(args)
    assert message in str(e.value)


def test_the_admin_token_is_not_echoed_in_an_error():
    with pytest.raises(ValueError) as e:
        build({"admin_token": "s3cret-token", "dtype": "float16"})
    assert "s3cret-token" not in str(e.value)
