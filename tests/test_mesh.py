"""Split sub-meshes and rule-declared parameter sharding on 8 forced CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qtl_jax.split import mesh as meshlib


def test_disjoint_sub_meshes_with_different_sizes():
    m = meshlib.split_meshes(2, 6, server_fsdp=2)
    client = set(d.id for d in m.client.devices.flat)
    server = set(d.id for d in m.server.devices.flat)
    assert len(client) == 2 and len(server) == 6 and not client & server
    assert dict(m.server.shape) == {"data": 3, "fsdp": 2}


def test_too_many_devices_is_a_clear_error():
    with pytest.raises(ValueError, match="client_devices=6 \\+ mesh.server_devices=4"):
        meshlib.split_meshes(6, 4)
    with pytest.raises(ValueError, match="fsdp must divide"):
        meshlib.make_mesh(jax.devices()[:6], fsdp=4)


def test_fsdp_rules_shard_the_largest_divisible_dimension():
    mesh = meshlib.make_mesh(jax.devices()[:4], fsdp=4)
    params = {"llm": {"kernel": jnp.zeros((6, 8)), "bias": jnp.zeros((3,))}, "vision": {"kernel": jnp.zeros((8, 8))}}
    sh = meshlib.param_shardings(params, mesh, [("vision/.*", "replicate"), (".*", "fsdp")])
    assert sh["llm"]["kernel"].spec == P(None, "fsdp")
    assert sh["llm"]["bias"].spec == P()  # 3 is not divisible by 4
    assert sh["vision"]["kernel"].spec == P()
    placed = jax.device_put(params, sh)
    assert placed["llm"]["kernel"].addressable_shards[0].data.shape == (6, 2)


def test_batch_sharding_spans_both_axes_and_a_jit_runs_on_the_sub_mesh():
    m = meshlib.split_meshes(4, 4, server_fsdp=2)
    x = jax.device_put(np.arange(16.0).reshape(8, 2), meshlib.batch_sharding(m.server, 2))
    y = jax.jit(lambda a: a * 2)(x)
    assert {d.id for d in y.devices()} == {d.id for d in m.server.devices.flat}
    np.testing.assert_array_equal(np.asarray(y), np.arange(16.0).reshape(8, 2) * 2)
