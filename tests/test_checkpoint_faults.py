"""Corrupt checkpoints: checksums catch damaged array bytes, damaged files are named, training falls back.

One toy stage-1 run (tiny config, checkpoints at steps 3 and 6) is made once; each test damages a copy of
its workdir the way a disk, a full filesystem or a killed copy would: a truncated array data file, a
truncated metadata file, 64 flipped bytes in the server parameters.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from configs import stage1
from qtl_jax.split import mesh as meshlib
from qtl_jax.split import step as steplib
from qtl_jax.train import checkpoint as ckptlib
from qtl_jax.train import loop
from qtl_jax.train.metrics_log import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir):
    c = stage1.get_config("tiny")  # 6 steps, a checkpoint every 3
    c.data.data_dir = data_dir
    c.mesh.client_devices = c.mesh.server_devices = 1
    c.eval.enabled = False
    return c


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``(workdir, config)`` of a finished toy run with checkpoints 3 and 6."""
    data_dir = str(tmp_path_factory.mktemp("data"))
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config(data_dir)
    loop.train_and_evaluate(config, workdir)
    assert ckptlib.Checkpointer(workdir).all_steps() == [3, 6]
    return workdir, config


@pytest.fixture
def copy(run, tmp_path):
    """A fresh copy of the run's workdir to damage."""
    return shutil.copytree(run[0], str(tmp_path / "run"))


def fresh_state(config, workdir):
    setup = loop.build_setup(config, workdir, jax.random.key_data(jax.random.key(0)))
    meshes = meshlib.split_meshes(1, 1)
    return steplib.create_train_state(setup.model, jax.random.key_data(jax.random.key(1)), meshes,
                                      config.optimizer.to_dict(), int(config.total_steps))


def data_files(workdir, step, item):
    """The OCDBT data files of an item, largest first (the big arrays' values live there)."""
    files = glob.glob(os.path.join(workdir, "checkpoints", str(step), item, "ocdbt.process_*", "d", "*"))
    return sorted(files, key=lambda f: (-os.path.getsize(f), f))


def truncate_array_file(workdir, step):
    f = data_files(workdir, step, "server_params")[0]
    os.truncate(f, os.path.getsize(f) // 2)


def truncate_metadata(workdir, step):
    f = os.path.join(workdir, "checkpoints", str(step), "server_params", "_METADATA")
    os.truncate(f, os.path.getsize(f) // 2)
    return f


def flip_bytes(workdir, step, count=64):
    f = data_files(workdir, step, "server_params")[0]
    with open(f, "r+b") as fh:
        data = bytearray(fh.read())
        middle = len(data) // 2
        for i in range(middle, middle + count):
            data[i] ^= 0xFF
        fh.seek(0)
        fh.write(data)


def rewrite_values(workdir, step, item, name, count=16):
    """Flips every bit of ``count`` float32 values of one array through TensorStore: the file stays a valid,
    decodable checkpoint whose content is wrong (what bit rot in memory before the write would leave)."""
    import tensorstore as ts

    item_dir = os.path.join(workdir, "checkpoints", str(step), item)
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": {"driver": "file", "path": item_dir},
                                          "path": name + "/"}}
    array = ts.open(spec, open=True, read=True, write=True).result()
    values = np.asarray(array.read().result())
    flat = values.reshape(-1).copy()
    flat[:count] = (flat[:count].view(np.uint32) ^ np.uint32(0xFFFFFFFF)).view(flat.dtype)
    array.write(flat.reshape(values.shape)).result()


def steps_on_disk(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


# ---------------------------------------------------------------------------------------------------
# Digests


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16, np.int32, np.uint32, np.int8,
                                   np.uint8, np.bool_])
def test_device_and_host_digests_agree(dtype):
    x = np.random.default_rng(0).normal(size=(37, 5)) * 50
    x = (x > 0) if dtype == np.bool_ else x.astype(dtype)
    on_device = ckptlib._fetch(ckptlib._device_lanes([jnp.asarray(x)]))[0]
    assert ckptlib.array_digest(x) == ckptlib._hex(*on_device)


def test_digest_of_64_bit_arrays_under_x64():
    with jax.enable_x64(True):
        x = np.arange(-20, 20, dtype=np.int64) * (2**40 + 3)
        on_device = ckptlib._fetch(ckptlib._device_lanes([jnp.asarray(x)]))[0]
        assert ckptlib.array_digest(x) == ckptlib._hex(*on_device)
        assert ckptlib.array_digest(x) != ckptlib.array_digest(x.astype(np.float64))


def test_digest_does_not_depend_on_sharding_or_host_chunking():
    x = np.random.default_rng(1).normal(size=(64, 2 * ckptlib._HOST_CHUNK // 64 + 8)).astype(np.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
    assert len(sharded.addressable_shards) == 8
    on_device = ckptlib._fetch(ckptlib._device_lanes([sharded]))[0]
    assert ckptlib.array_digest(x) == ckptlib._hex(*on_device)  # the host digest crosses two chunks


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), position=st.data(), bit=st.integers(0, 31), seed=st.integers(0, 2**32 - 1))
def test_any_flipped_bit_changes_the_digest(n, position, bit, seed):
    # Each word enters both sums through a bijection keyed by its position: one changed word always shows.
    x = np.random.default_rng(seed).integers(0, 2**32, size=n, dtype=np.uint32)
    i = position.draw(st.integers(0, n - 1))
    y = x.copy()
    y[i] ^= np.uint32(1 << bit)
    assert ckptlib.array_digest(y) != ckptlib.array_digest(x)


def test_swapped_values_change_the_digest():
    x = np.arange(10, dtype=np.float32)
    assert ckptlib.array_digest(x[::-1]) != ckptlib.array_digest(x)


def test_json_digest_ignores_key_order_and_spacing():
    assert ckptlib.json_digest({"a": 1, "b": [1.5, "x"]}) == ckptlib.json_digest({"b": [1.5, "x"], "a": 1})
    assert ckptlib.json_digest({"a": 1}) != ckptlib.json_digest({"a": 2})


def test_typed_prng_keys_are_checksummed_as_their_key_data(tmp_path):
    params = {"w": jnp.arange(3, dtype=jnp.float32)}
    state = steplib.TrainState(step=jnp.int32(2), client=steplib.PartitionState(params, {}, {}),
                               server=steplib.PartitionState({}, {}, {}), rng=jax.random.key(5))
    ckpt = ckptlib.Checkpointer(str(tmp_path))
    ckpt.save(state, {}, {})
    ckpt.wait()
    with open(os.path.join(ckpt.directory, "2", "checksums", "metadata")) as f:
        saved = json.load(f)["arrays"]["train"]["rng"]
    key_data = np.asarray(jax.random.key_data(state.rng))
    assert saved == {"digest": ckptlib.array_digest(key_data), "shape": [2], "dtype": "uint32"}
    assert ckpt.verify(2)
    restored, _ = ckpt.restore(state, step=2)
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(restored.rng)), key_data)


# ---------------------------------------------------------------------------------------------------
# Verification and fallback through the Checkpointer API


def test_intact_run_verifies_and_records_every_array(run):
    workdir, _ = run
    ckpt = ckptlib.Checkpointer(workdir)
    assert ckpt.verify(6) is True and ckpt.is_intact(3)
    with open(os.path.join(workdir, "checkpoints", "6", "checksums", "metadata")) as f:
        sums = json.load(f)
    assert set(sums["arrays"]) == {"client_params", "client_opt", "server_params", "server_opt", "train"}
    assert "llm.embed_tokens.embedding" in sums["arrays"]["server_params"]
    assert set(sums["json"]) == {"data", "config"}


@pytest.mark.parametrize("damage", ["truncated array file", "truncated metadata", "64 flipped bytes",
                                    "rewritten values"])
def test_corrupt_latest_is_reported_in_one_line_and_falls_back(run, copy, damage):
    workdir, config = run
    item_dir = os.path.join(copy, "checkpoints", "6", "server_params")
    if damage == "truncated array file":
        truncate_array_file(copy, 6)
        where, problem = item_dir, "cannot be read: OUT_OF_RANGE"
    elif damage == "truncated metadata":
        where, problem = truncate_metadata(copy, 6), "unreadable metadata file"
    elif damage == "64 flipped bytes":
        flip_bytes(copy, 6)
        # Garbled zstd data either fails to decode or decodes to other values; both are caught.
        where, problem = item_dir, ""
    else:
        rewrite_values(copy, 6, "server_params", "llm.embed_tokens.embedding")
        where, problem = item_dir, "array 'llm.embed_tokens.embedding' does not match its checksum"

    ckpt = ckptlib.Checkpointer(copy)
    assert not ckpt.is_intact(6) and ckpt.is_intact(3)
    with pytest.raises(ckptlib.CorruptCheckpointError) as bad:
        ckpt.verify(6)
    assert (bad.value.step, bad.value.where) == (6, where) and problem in bad.value.problem
    assert "\n" not in str(bad.value)

    lines = []
    ckpt = ckptlib.Checkpointer(copy, report=lines.append)
    assert ckpt.latest_step() == 3
    assert lines == [f"qtl_jax: {bad.value}; moved it to {os.path.join(copy, 'checkpoints', '6.corrupt')} and "
                     "falling back to step 3 (verified)."]
    assert steps_on_disk(copy) == ["3", "6.corrupt"] and ckpt.all_steps() == [3]

    like = fresh_state(config, copy)
    state, data_state = ckpt.restore(like)
    expected, expected_data = ckptlib.Checkpointer(workdir).restore(like, step=3)
    assert int(state.step) == 3 and data_state == expected_data
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_without_fallback_the_corrupt_latest_stops_with_one_line(copy):
    truncate_array_file(copy, 6)
    ckpt = ckptlib.Checkpointer(copy, fallback=False, report=pytest.fail)
    with pytest.raises(ckptlib.CorruptCheckpointError, match=r"^checkpoint step 6 is corrupt: array '[\w.]+' cannot "
                       r"be read: .*; not falling back to an older checkpoint \(checkpoint_fallback=False\)") as e:
        ckpt.latest_step()
    assert "\n" not in str(e.value) and os.path.join(copy, "checkpoints", "6", "server_params") in str(e.value)
    assert steps_on_disk(copy) == ["3", "6"]  # nothing moved


def test_no_intact_checkpoint_stops_and_moves_nothing(copy):
    flip_bytes(copy, 3)  # the case: a flip in the only older checkpoint ...
    truncate_metadata(copy, 6)
    ckpt = ckptlib.Checkpointer(copy, report=pytest.fail)
    with pytest.raises(ckptlib.CorruptCheckpointError, match=r"^no intact checkpoint in .*: step 6: unreadable "
                       r"metadata file .*; step 3: .*Nothing was moved") as e:
        ckpt.latest_step()
    assert "\n" not in str(e.value)
    assert steps_on_disk(copy) == ["3", "6"]
    assert not ckpt.is_intact(3)  # ... which the NaN message must no longer call intact


def test_explicit_step_restore_of_a_corrupt_step_raises_without_tracebacks(run, copy, capfd):
    truncate_array_file(copy, 6)
    ckpt = ckptlib.Checkpointer(copy)
    with pytest.raises(ckptlib.CorruptCheckpointError, match="checkpoint step 6 is corrupt"):
        ckpt.restore(fresh_state(run[1], copy), step=6)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err


def test_damaged_data_json_is_caught(copy):
    path = os.path.join(copy, "checkpoints", "6", "data", "metadata")
    with open(path) as f:
        data = json.load(f)
    data["process_0"] = {"moved": data["process_0"]}  # still valid JSON, but not the loader state saved
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(ckptlib.CorruptCheckpointError) as e:
        ckptlib.Checkpointer(copy).verify(6)
    assert (e.value.where, e.value.problem) == (path, "the JSON does not match its checksum")


def test_checkpoint_without_checksums_restores_with_a_note(run, copy):
    """Checkpoints written before checksums existed still restore (read in full), and say so once."""
    for step in (3, 6):
        shutil.rmtree(os.path.join(copy, "checkpoints", str(step), "checksums"))
    lines = []
    ckpt = ckptlib.Checkpointer(copy, report=lines.append)
    assert ckpt.verify(6) is False and ckpt.latest_step() == 6 and ckpt.latest_step() == 6
    assert len(lines) == 1 and "step 6" in lines[0] and "has no checksums" in lines[0]
    state, _ = ckpt.restore(fresh_state(run[1], copy))
    assert int(state.step) == 6


def test_restore_params_skips_a_corrupt_step_without_moving_it(run, copy):
    workdir, config = run
    rewrite_values(copy, 6, "server_params", "llm.embed_tokens.embedding")
    like = fresh_state(config, copy)
    lines = []
    client, server, _, step = ckptlib.restore_params(copy, like, report=lines.append)
    assert step == 3 and len(lines) == 1
    assert lines[0].startswith("qtl_jax: checkpoint step 6 is corrupt: array 'llm.embed_tokens.embedding' does "
                               "not match its checksum") and lines[0].endswith("using step 3 (verified) instead.")
    assert steps_on_disk(copy) == ["3", "6"]  # another run's workdir: reported, not moved
    expected, _ = ckptlib.Checkpointer(workdir).restore(like, step=3)
    for a, b in zip(jax.tree.leaves((client, server)), jax.tree.leaves((expected.client.params,
                                                                         expected.server.params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ckptlib.CorruptCheckpointError, match="checkpoint step 6 is corrupt"):
        ckptlib.restore_params(copy, like, fallback=False)


def test_restore_params_reads_only_the_partitions_the_new_run_holds(run, tmp_path):
    """One side of a network split run holds the other partition empty: it is neither read nor required, so
    a split server's own workdir (server partition only, as ``python -m qtl_jax.split.server`` saves it)
    starts the next stage's server."""
    workdir, config = run
    full = fresh_state(config, workdir)
    empty = steplib.PartitionState({}, {}, {})
    expected, _ = ckptlib.Checkpointer(workdir).restore(full, step=6)
    client, server, stats, step = ckptlib.restore_params(workdir, full.replace(client=empty))
    assert step == 6 and client == {} and stats == {}
    for a, b in zip(jax.tree.leaves(server), jax.tree.leaves(expected.server.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    server_side = str(tmp_path / "server")
    checkpointer = ckptlib.Checkpointer(server_side)
    checkpointer.save(expected.replace(client=empty), {}, {})
    checkpointer.close()
    client, server, stats, step = ckptlib.restore_params(server_side, full.replace(client=empty))
    assert step == 6 and client == {} and stats == {}
    for a, b in zip(jax.tree.leaves(server), jax.tree.leaves(expected.server.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------------
# The training loop, unchanged, on top of it


def test_training_resumes_from_the_intact_checkpoint_and_reproduces_the_losses(run, copy, capfd):
    workdir, config = run
    truncate_array_file(copy, 6)
    capfd.readouterr()
    result = loop.train_and_evaluate(config, copy)
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("qtl_jax: checkpoint step 6 is corrupt: array ") and \
        err[0].endswith("falling back to step 3 (verified).")
    assert result["step"] == 6
    losses = lambda d: [(r["step"], r["loss"]) for r in read_jsonl(os.path.join(d, "metrics.jsonl"))]  # noqa: E731
    assert losses(copy) == losses(workdir)  # steps 4-6 re-run exactly; no duplicate lines
    assert steps_on_disk(copy) == ["3", "6", "6.corrupt"]
    assert ckptlib.Checkpointer(copy).verify(6)


@pytest.mark.slow  # ~30 s: train.py builds the model before it opens the checkpoints
def test_train_py_with_no_intact_checkpoint_prints_one_line(run, copy):
    truncate_metadata(copy, 6)
    truncate_metadata(copy, 3)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env.pop("QTL_JAX_TRACEBACK", None)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/stage1.py:tiny", f"--workdir={copy}",
           f"--config.data.data_dir={run[1].data.data_dir}", "--config.eval.enabled=False",
           "--config.mesh.client_devices=1", "--config.mesh.server_devices=1"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    err = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 1, out.stderr[-3000:]
    assert len(err) == 1 and err[0].startswith(f"train.py: CorruptCheckpointError: no intact checkpoint in "
                                               f"{os.path.join(copy, 'checkpoints')}: step 6: "), out.stderr[-3000:]
    assert steps_on_disk(copy) == ["3", "6"]
