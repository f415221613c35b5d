"""The grain loader: deterministic order, epochs, host split, counted skips and exact resume."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qtl_jax.data import loader as ld


def _to_example(i):
    return {"x": np.int64(i), "sq": np.array([i, i * i], dtype=np.int64)}


def _skip_sevens(example):
    # Rejects every record divisible by 7 after the first transform, like a tokenisation mismatch.
    i = int(example["x"])
    if i % 7 == 0:
        return ld.SkippedExample("divisible_by_7", example_id=str(i), detail="test rejection")
    return example


def _loader(n=20, skip=False, **kw):
    host = {k: kw.pop(k) for k in ("process_index", "process_count") if k in kw}
    host.setdefault("process_index", 0)
    host.setdefault("process_count", 1)
    kw.setdefault("read_threads", 1)
    ops = [_to_example] + ([_skip_sevens] if skip else [])
    return ld.DataLoader(list(range(n)), ops, ld.LoaderConfig(**kw), **host)


def _xs(batches):
    return [b["x"].tolist() for b in batches]


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_same_seed_same_order_each_epoch_a_permutation():
    a = _xs(_loader(n=12, global_batch_size=4, seed=3, num_epochs=2))
    b = _xs(_loader(n=12, global_batch_size=4, seed=3, num_epochs=2))
    assert a == b and len(a) == 6
    epoch1, epoch2 = sum(a[:3], []), sum(a[3:], [])
    assert sorted(epoch1) == sorted(epoch2) == list(range(12))
    assert epoch1 != epoch2  # reshuffled per epoch
    assert epoch1 != list(range(12))
    other = _xs(_loader(n=12, global_batch_size=4, seed=4, num_epochs=2))
    assert other != a
    assert _xs(_loader(n=6, global_batch_size=3, shuffle=False, num_epochs=2)) == [
        [0, 1, 2], [3, 4, 5], [0, 1, 2], [3, 4, 5]]


def test_batch_fields_and_remainder():
    batches = list(_loader(n=10, global_batch_size=4, num_epochs=1))
    assert len(batches) == 2
    assert batches[0]["sq"].shape == (4, 2) and batches[0]["sq"].dtype == np.int64
    np.testing.assert_array_equal(batches[0]["sq"][:, 1], batches[0]["x"] ** 2)
    kept = list(_loader(n=10, global_batch_size=4, num_epochs=1, drop_remainder=False))
    assert [len(b["x"]) for b in kept] == [4, 4, 2]
    assert sorted(sum(_xs(kept), [])) == list(range(10))


def test_skips_are_counted_and_batches_stay_full(caplog):
    it = _loader(n=21, skip=True, global_batch_size=4, num_epochs=1, shuffle=False, log_skips=2)
    batches = list(it)
    # 0, 7, 14 rejected: 18 examples -> 4 full batches, 2 dropped.
    assert _xs(batches) == [[1, 2, 3, 4], [5, 6, 8, 9], [10, 11, 12, 13], [15, 16, 17, 18]]
    assert it.skipped == {"divisible_by_7": 3}
    assert it.metrics() == {"batches": 4, "skipped_total": 3, "skipped/divisible_by_7": 3}
    logged = [r.getMessage() for r in caplog.records if "skipping example" in r.getMessage()]
    assert logged == [
        "skipping example '0' (divisible_by_7): test rejection",
        "skipping example '7' (divisible_by_7): test rejection",
    ]


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_resume_continues_with_next_unseen_batch(k):
    kw = dict(n=23, skip=True, global_batch_size=4, seed=11, num_epochs=3)
    full = _xs(_loader(**kw))
    first = _loader(**kw)
    head = _xs(_take(first, k))
    state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
    resumed = _loader(**kw)
    resumed.set_state(state)
    assert resumed.skipped == first.skipped
    assert head + _xs(resumed) == full
    assert resumed.metrics()["batches"] == len(full)
    # Every record is read once per epoch, including those of the dropped last partial batch.
    assert resumed.skipped == {"divisible_by_7": 4 * 3}  # 0, 7, 14, 21 in each of 3 epochs


def test_resume_after_the_end_stays_exhausted():
    it = _loader(n=8, global_batch_size=4, num_epochs=1)
    assert len(list(it)) == 2
    again = _loader(n=8, global_batch_size=4, num_epochs=1)
    again.set_state(json.loads(json.dumps(it.get_state())))
    assert list(again) == []


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 30),
    batch=st.integers(1, 6),
    k=st.integers(0, 8),
    seed=st.integers(0, 2**32 - 1),
    epochs=st.sampled_from([1, 2, None]),
)
def test_resume_property(n, batch, k, seed, epochs):
    kw = dict(n=n, global_batch_size=batch, seed=seed, num_epochs=epochs)
    horizon = k + 4
    reference = _loader(**kw)
    expected = []
    for _ in range(horizon):
        try:
            expected.append(next(reference)["x"].tolist())
        except StopIteration:
            break
    first = _loader(**kw)
    got = []
    for _ in range(min(k, len(expected))):
        got.append(next(first)["x"].tolist())
    resumed = _loader(**kw)
    resumed.set_state(json.loads(json.dumps(first.get_state())))
    while len(got) < len(expected):
        got.append(next(resumed)["x"].tolist())
    assert got == expected


def test_hosts_split_each_global_batch():
    single = _xs(_take(_loader(n=15, global_batch_size=6, seed=5), 7))
    hosts = [
        _xs(_take(_loader(n=15, global_batch_size=6, seed=5, process_index=p, process_count=3), 7))
        for p in range(3)
    ]
    for j in range(7):
        per_host = [hosts[p][j] for p in range(3)]
        assert all(len(b) == 2 for b in per_host)
        assert sorted(sum(per_host, [])) == sorted(single[j])


def test_settings_mismatch_refuses_to_resume():
    it = _loader(n=10, global_batch_size=2, seed=1)
    next(it)
    state = it.get_state()
    other = _loader(n=10, global_batch_size=2, seed=2)
    with pytest.raises(ValueError, match=r"different settings \(saved, now\): \{'seed': \(1, 2\)\}"):
        other.set_state(state)
    with pytest.raises(ValueError, match="state version 0 is not 1"):
        other.set_state({**state, "version": 0})


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="does not split evenly over 3 hosts"):
        _loader(global_batch_size=4, process_index=0, process_count=3)
    with pytest.raises(ValueError, match=r"process_index=2 is not in \[0, process_count=2\)"):
        _loader(global_batch_size=4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="global_batch_size must be >= 1"):
        ld.LoaderConfig(global_batch_size=0)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\)"):
        ld.LoaderConfig(global_batch_size=1, seed=-1)
    with pytest.raises(ValueError, match="data source is empty"):
        ld.DataLoader([], [], ld.LoaderConfig(global_batch_size=1), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="examples have different fields"):
        ld.stack_examples([{"a": 1}, {"b": 2}])


def test_to_global_arrays_places_rows_on_devices():
    devices = np.array(jax.devices()[:8])
    mesh = Mesh(devices, ("data",))
    batch = next(_loader(n=16, global_batch_size=8, seed=0))
    arrays = ld.to_global_arrays(batch, NamedSharding(mesh, P("data")))
    assert arrays["sq"].shape == (8, 2)
    np.testing.assert_array_equal(np.asarray(arrays["x"]), batch["x"])
    assert [s.data.shape for s in arrays["sq"].addressable_shards] == [(1, 2)] * 8


@pytest.mark.slow
def test_worker_processes_resume_exactly():
    kw = dict(n=30, skip=True, global_batch_size=4, seed=2, num_epochs=2, worker_count=2)
    full = _xs(_loader(**kw))
    first = _loader(**kw)
    head = _xs(_take(first, 3))
    state = json.loads(json.dumps(first.get_state()))
    resumed = _loader(**kw)
    resumed.set_state(state)
    assert head + _xs(resumed) == full
    assert resumed.skipped == {"divisible_by_7": 10}


def test_worker_processes_outside_an_absl_app(tmp_path):
    """A plain Python script (no absl.app, flags never parsed) loads a built dataset with worker_count=1 and
    gets the batches the in-process loader gets; before the fix grain raised UnparsedFlagAccessError."""
    from qtl_jax.data import llava_tfds as lt

    rows = [{"id": f"row{i}", "conversations": [{"from": "human", "value": f"Q{i}?"},
                                                {"from": "gpt", "value": f"A{i}."}]} for i in range(6)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    dataset = lt.build(str(tmp_path / "d"), "plain", {"train": [str(tmp_path / "rows.json")]})
    script = tmp_path / "plain_script.py"
    script.write_text(textwrap.dedent(f"""
        import json
        import sys

        from qtl_jax.data import llava_tfds, loader


        def ids(record):
            return {{"id": llava_tfds.decode_record(record)["id"]}}


        if __name__ == "__main__":
            config = loader.LoaderConfig(global_batch_size=2, seed=3, num_epochs=1, worker_count=int(sys.argv[1]))
            source = llava_tfds.open_split({dataset!r}, "train")
            batches = loader.DataLoader(source, [ids], config, process_index=0, process_count=1)
            print(json.dumps([b["id"].tolist() for b in batches]))
    """))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo}
    proc = subprocess.run([sys.executable, str(script), "1"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    remote = json.loads(proc.stdout.strip().splitlines()[-1])
    source = lt.open_split(dataset, "train")
    local = ld.DataLoader(source, [lambda r: {"id": lt.decode_record(r)["id"]}],
                          ld.LoaderConfig(global_batch_size=2, seed=3, num_epochs=1), process_index=0,
                          process_count=1)
    assert remote == [b["id"].tolist() for b in local]
    assert sorted(sum(remote, [])) == sorted(r["id"] for r in rows)
