"""The declarative key maps and the safetensors checkpoint directories."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from qtl_jax.weights import keymap as km
from qtl_jax.weights import safetensors_io as st

RULES = [
    km.Rule("model.layers.{i}.q.weight", "layers_{i}/q/kernel", km.LINEAR),
    km.Rule(
        "model.layers.{i}.qkv.weight",
        ("layers_{i}/a/kernel", "layers_{i}/b/kernel"),
        km.Split(0, lambda ctx: [2, 1], km.LINEAR),
    ),
    km.Rule("model.patch.weight", "patch/kernel", km.CONV2D),
    km.Rule("model.rotary.inv_freq", None),
]
CKPT = {
    "model.layers.0.q.weight": np.arange(6.0).reshape(3, 2),
    "model.layers.1.q.weight": np.arange(6.0).reshape(3, 2) + 10,
    "model.layers.0.qkv.weight": np.arange(6.0).reshape(3, 2),
    "model.patch.weight": np.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5),
    "model.rotary.inv_freq": np.ones(2),
}
EXPECTED = {
    "layers_0/q/kernel": (2, 3),
    "layers_1/q/kernel": (2, 3),
    "layers_0/a/kernel": (2, 2),
    "layers_0/b/kernel": (2, 1),
    "patch/kernel": (4, 5, 3, 2),
}


def test_convert_transforms_and_export_round_trip():
    params = km.convert(CKPT, RULES, EXPECTED)
    np.testing.assert_array_equal(params["layers_1/q/kernel"], CKPT["model.layers.1.q.weight"].T)
    np.testing.assert_array_equal(params["layers_0/a/kernel"], CKPT["model.layers.0.qkv.weight"][:2].T)
    np.testing.assert_array_equal(params["patch/kernel"][1, 2, 0, 1], CKPT["model.patch.weight"][1, 0, 1, 2])
    back = km.export(params, RULES)
    assert sorted(back) == sorted(k for k in CKPT if "inv_freq" not in k)
    for k, v in back.items():
        np.testing.assert_array_equal(v, CKPT[k])


def test_every_problem_is_reported_at_once():
    bad = dict(CKPT)
    bad["model.extra.weight"] = np.ones(3)
    bad["model.layers.1.q.weight"] = np.ones((4, 2))
    del bad["model.patch.weight"]
    with pytest.raises(km.WeightMismatchError) as e:
        km.convert(bad, RULES, {**EXPECTED, "norm/scale": (3,)})
    msg = str(e.value)
    assert "model.extra.weight" in msg and "unmapped" in msg
    assert "patch/kernel" in msg and "norm/scale" in msg and "missing" in msg
    assert "checkpoint (2, 4) vs model (2, 3)" in msg


def test_flatten_unflatten_and_prefix():
    tree = {"a": {"b": {"c": 1}, "d": 2}}
    assert km.flatten(tree) == {"a/b/c": 1, "a/d": 2}
    assert km.unflatten(km.flatten(tree)) == tree
    r = km.with_prefix(RULES[:1], "language_model.", "llm/")[0]
    assert r.source == "language_model.model.layers.{i}.q.weight" and r.targets == ("llm/layers_{i}/q/kernel",)


def test_safetensors_round_trip_with_bf16_and_shards(tmp_path):
    tensors = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.arange(5).astype(ml_dtypes.bfloat16),
        "c": np.array([1, 2], dtype=np.int64),
    }
    st.write_file(str(tmp_path / "one.safetensors"), tensors)
    got = st.read_file(str(tmp_path / "one.safetensors"))
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype
        np.testing.assert_array_equal(got[k], v)
    shard = tmp_path / "sharded"
    shard.mkdir()
    st.write_file(str(shard / "m-1.safetensors"), {"a": tensors["a"]})
    st.write_file(str(shard / "m-2.safetensors"), {"b": tensors["b"]})
    (shard / st.INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}))
    assert sorted(st.read_dir(str(shard))) == ["a", "b"]


def test_the_library_handles_bf16_so_the_module_only_adds_directories(tmp_path):
    """bfloat16 without torch was the reason for a hand-written reader; safetensors.numpy and
    safetensors.flax read and write it (0.8.0), so the module now defers to the library."""
    import jax.numpy as jnp
    import safetensors.flax
    import safetensors.numpy

    b = (np.arange(6, dtype=np.float32).reshape(2, 3) / 7).astype(ml_dtypes.bfloat16)
    safetensors.numpy.save_file({"b": b}, str(tmp_path / "np.safetensors"))
    safetensors.flax.save_file({"b": jnp.asarray(b)}, str(tmp_path / "flax.safetensors"))
    for name in ("np", "flax"):
        for got in (st.read_file(str(tmp_path / f"{name}.safetensors"))["b"],
                    safetensors.numpy.load_file(str(tmp_path / f"{name}.safetensors"))["b"],
                    np.asarray(safetensors.flax.load_file(str(tmp_path / f"{name}.safetensors"))["b"])):
            assert got.dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(got.view(np.uint16), b.view(np.uint16))


def test_write_file_stores_views_as_they_read_which_the_library_alone_does_not(tmp_path):
    import safetensors.numpy

    kernel = np.arange(12, dtype=np.float32).reshape(3, 4).T  # a transposed view, as exported kernels are
    safetensors.numpy.save_file({"w": kernel}, str(tmp_path / "lib.safetensors"))
    raw = safetensors.numpy.load_file(str(tmp_path / "lib.safetensors"))["w"]
    assert raw.shape == (4, 3) and not np.array_equal(raw, kernel)  # the library wrote the untransposed bytes
    st.write_file(str(tmp_path / "ours.safetensors"), {"w": kernel})
    np.testing.assert_array_equal(safetensors.numpy.load_file(str(tmp_path / "ours.safetensors"))["w"], kernel)


def test_checkpoint_is_a_lazy_mapping_over_its_shards(tmp_path):
    st.write_file(str(tmp_path / "m-1.safetensors"), {"a": np.ones(2, np.float32), "c": np.zeros(1, np.int8)})
    st.write_file(str(tmp_path / "m-2.safetensors"), {"b": np.full(3, 2.0, np.float16)})
    (tmp_path / st.INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "m-1.safetensors", "c": "m-1.safetensors",
                                                                     "b": "m-2.safetensors"}}))
    ckpt = st.read_dir(str(tmp_path))
    assert len(ckpt) == 3 and sorted(ckpt) == ["a", "b", "c"] and "b" in ckpt and "z" not in ckpt
    np.testing.assert_array_equal(ckpt["b"], np.full(3, 2.0, np.float16))
    with pytest.raises(KeyError):
        ckpt["z"]
    (tmp_path / st.INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "m-1.safetensors", "d": "m-2.safetensors"}}))
    with pytest.raises(ValueError, match=r"absent from its shards: \['d'\]"):
        st.read_dir(str(tmp_path))


@pytest.mark.parametrize("blob", [b"", b"\x01\x02", (10**12).to_bytes(8, "little") + b"{}", (5).to_bytes(8, "little") + b"{nope"])
def test_corrupt_safetensors_gives_a_clear_error(tmp_path, blob):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(blob)
    with pytest.raises(ValueError, match="safetensors"):
        st.read_file(str(p))


def test_missing_weights_file_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="safetensors"):
        st.read_dir(str(tmp_path))
    assert os.path.isdir(tmp_path)
