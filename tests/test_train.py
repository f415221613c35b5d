"""The training job: configs, train_and_evaluate end to end at toy size, logs, eval, stage chaining, NaN stop."""

import json
import os

import jax
import numpy as np
import pytest

from configs import stage1, stage2
from qtl_jax.data.constants import IGNORE_INDEX
from qtl_jax.train import checkpoint as ckptlib
from qtl_jax.train import demo_eval, loop
from qtl_jax.train import setup as setuplib
from qtl_jax.train.metrics_log import read_jsonl

REQUIRED_FIELDS = ("step", "loss", "ce", "uplink_bytes_fp16", "uplink_bytes_packed", "uplink_bytes_ans",
                   "downlink_bytes", "examples_per_sec", "tokens_per_sec", "step_time", "lr", "dist_image",
                   "dist_text", "entropy_image", "entropy_text")


def tiny(stage: int, data_dir: str, **overrides):
    c = (stage1 if stage == 1 else stage2).get_config("tiny")
    c.data.data_dir = data_dir
    # Disjoint one-device client and server meshes: the real split, and the cheapest compiles.
    c.mesh.client_devices = c.mesh.server_devices = 1
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shapes_data"))


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    # Compile time dominates toy runs (flax examples' train_test does the same).
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, data_dir):
    """A toy stage 1 whose batch 4 (0-based) is poisoned: it stops at step 5; the rerun resumes at step 4."""
    workdir = str(tmp_path_factory.mktemp("stage1"))
    c = tiny(1, data_dir, **{"debug.poison_step": 4, "checkpoint_every": 2})
    # An earlier attempt that died before its first checkpoint left lines for steps 1-3.
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"step": s, "loss": -1.0}) + "\n" for s in (1, 2, 3))
    with pytest.raises(loop.NonFiniteLossError) as stopped:
        loop.train_and_evaluate(c, workdir)
    at_stop = {
        "message": str(stopped.value),
        "checkpoints": sorted(ckptlib.Checkpointer(workdir).all_steps()),
        "logged": [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))],
        "losses": [r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))],
    }
    c.debug.poison_step = -1
    from qtl_jax.split import step as steplib

    random_init, inits = steplib.init_params_jit, []
    steplib.init_params_jit = lambda *a: inits.append(1) or random_init(*a)
    try:
        result = loop.train_and_evaluate(c, workdir)
    finally:
        steplib.init_params_jit = random_init
    at_stop["random_inits_on_resume"] = len(inits)
    return workdir, result, at_stop


# ---------------------------------------------------------------------------------------------------
# Configs.

def test_paper_recipes():
    c1, c2 = stage1.get_config(), stage2.get_config()
    assert (c1.optimizer.lr, c1.optimizer.weight_decay, c1.optimizer.warmup_ratio, c1.global_batch_size) == (
        5e-4, 0.1, 0.02, 64)
    assert (c2.optimizer.lr, c2.optimizer.weight_decay, c2.optimizer.warmup_ratio, c2.global_batch_size) == (
        2e-5, 0.0, 0.03, 16)
    for c in (c1, c2):
        assert c.optimizer.schedule == "cosine" and c.data.num_epochs == 1 and c.total_steps == -1
        assert c.quantizer.levels == 4 and c.model.max_length == 2048 and c.model.source == "components"
    assert c1.data.template == "pretrain" and c2.data.template == "llama"
    frozen1 = {p for p, v in c1.optimizer.param_groups if v == "frozen"}
    frozen2 = {p for p, v in c2.optimizer.param_groups if v == "frozen"}
    assert frozen1 == {r"client/vision_tower/.*", r"client/embed_tokens/.*", r"server/llm/.*"}
    assert frozen2 == {r"client/vision_tower/.*"}


def test_demo_variants_train_everything():
    for mod in (stage1, stage2):
        c = mod.get_config("demo")
        assert c.optimizer.param_groups == ((".*", 1.0),)
        assert c.data.kind == "shapes" and c.model.source == "random"
        assert c.model.vision.image_size == 64 and c.model.vision.patch_size == 8 and c.model.llm.hidden_size == 128
    assert stage2.get_config("demo").init.from_workdir == "/tmp/qtl_demo/stage1"
    with pytest.raises(ValueError, match="unknown config variant 'nope'"):
        stage1.get_config("nope")


def test_missing_checkpoint_paths_name_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--config\.model\.vision_dir="):
        loop.train_and_evaluate(stage1.get_config(), str(tmp_path / "a"))
    c = stage1.get_config()
    c.model.vision_dir = str(tmp_path)
    c.model.llm_dir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"model\.llm_dir=.*does not exist"):
        loop.train_and_evaluate(c, str(tmp_path / "b"))
    c = stage2.get_config()
    c.init.checkpoint = str(tmp_path / "missing_ckpt")
    with pytest.raises(FileNotFoundError, match=r"--config\.init\.checkpoint="):
        loop.train_and_evaluate(c, str(tmp_path / "c"))
    c = stage2.get_config("demo")
    c.init.from_workdir = str(tmp_path / "no_stage1")
    with pytest.raises(FileNotFoundError, match=r"--config\.init\.from_workdir="):
        loop.train_and_evaluate(c, str(tmp_path / "d"))


# ---------------------------------------------------------------------------------------------------
# Evaluation scoring.

def test_answer_spans_and_scores():
    # Two rows; targets are labels shifted by one. Row 0 has answers at target positions 1-2 and 4;
    # row 1 one answer at 0-2.
    labels = np.full((2, 6), IGNORE_INDEX)
    labels[0, 2:4] = [5, 6]
    labels[0, 5] = 7
    labels[1, 1:4] = [5, 6, 8]
    assert demo_eval.answer_spans(labels[:, 1:]) == [(0, 1, 3), (0, 4, 5), (1, 0, 3)]
    logits = np.zeros((2, 6, 10))
    # Row 0: predicts 5, 6 (right) then 3 (wrong); row 1: 5, 6 right, 9 wrong.
    for row, pos, tok in [(0, 1, 5), (0, 2, 6), (0, 4, 3), (1, 0, 5), (1, 1, 6), (1, 2, 9)]:
        logits[row, pos, tok] = 1.0
    t = demo_eval.Tally()
    t.add(logits, labels, ce=2.0)
    r = t.results()
    assert r["exact_match"] == pytest.approx(1 / 3)
    assert r["token_accuracy"] == pytest.approx(4 / 6)
    assert r["majority_token_accuracy"] == pytest.approx(2 / 6)  # 5 and 6 twice each
    assert r["majority_exact_match"] == pytest.approx(1 / 3)  # three distinct answers
    assert (r["answers"], r["target_tokens"], r["ce"]) == (3, 6, 2.0)
    with pytest.raises(ValueError, match="no answer tokens"):
        demo_eval.Tally().results()


# ---------------------------------------------------------------------------------------------------
# End to end (toy size).

def test_nan_loss_stops_and_keeps_last_good_checkpoint(stage1_run):
    _, _, at_stop = stage1_run
    assert "loss is nan at step 5" in at_stop["message"]
    assert "last good checkpoint is step 4" in at_stop["message"] and "intact" in at_stop["message"]
    assert at_stop["checkpoints"] == [2, 4]  # nothing was saved after the bad step
    assert at_stop["logged"] == [1, 2, 3, 4]


def test_fresh_start_drops_metrics_lines_of_an_attempt_without_checkpoint(stage1_run):
    """The earlier attempt's steps 1-3 are not followed by the new run's 1, 2, 3, 4 (issue 16 item 5)."""
    _, _, at_stop = stage1_run
    assert at_stop["logged"] == [1, 2, 3, 4] and -1.0 not in at_stop["losses"]


def test_stage1_resumes_and_writes_metrics_checkpoints_eval(stage1_run):
    workdir, result, at_stop = stage1_run
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 7))  # resumed at 4, no duplicate lines
    assert at_stop["random_inits_on_resume"] == 0  # restored into the abstract template
    for r in records:
        missing = [k for k in REQUIRED_FIELDS if k not in r]
        assert not missing, missing
        assert np.isfinite(r["loss"]) and r["uplink_bytes_ans"] < r["uplink_bytes_packed"] < r["uplink_bytes_fp16"]
        assert r["loss"] == pytest.approx(r["ce"] + r["dist_image"] + r["dist_text"])
    assert result["step"] == 6 and result["loss"] == records[-1]["loss"]
    assert sorted(ckptlib.Checkpointer(workdir).all_steps()) == [4, 6]  # keep_checkpoints=2
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["stage"] == 1
    ev = read_jsonl(os.path.join(workdir, "eval.jsonl"))
    assert len(ev) == 1 and ev[0] == {"step": 6, **result["eval"]}
    assert 0 <= ev[0]["exact_match"] <= 1 and ev[0]["answers"] == 16  # one caption per held-out sample
    assert ev[0]["majority_token_accuracy"] < 1


def test_split_workdirs_evaluate_as_the_run_did(stage1_run, data_dir, tmp_path):
    """The evaluation of a network run (client and server checkpoints in two workdirs) rebuilt in process:
    here both partitions come from one in-process workdir, each restored with the other held empty,
    so the figures must be the run's own end-of-stage evaluation, bit for bit."""
    workdir, result, _ = stage1_run
    out = str(tmp_path / "eval")
    ev = loop.evaluate_split_workdirs(tiny(1, data_dir), workdir, workdir, out)
    assert ev["step"] == ev["server_step"] == 6
    drop = lambda d: {k: v for k, v in d.items() if k != "eval_seconds"}  # noqa: E731
    assert drop(ev) == {"step": 6, "server_step": 6, **drop(result["eval"])}
    assert read_jsonl(os.path.join(out, "eval.jsonl")) == [ev]


def test_stage2_starts_from_stage1_params(stage1_run, data_dir, tmp_path, monkeypatch):
    from qtl_jax.split import mesh as meshlib
    from qtl_jax.split import step as steplib

    workdir1 = stage1_run[0]
    c = tiny(2, data_dir, **{"init.from_workdir": workdir1})
    setup = setuplib.build_setup(c, str(tmp_path), jax.random.key_data(jax.random.key(0)))
    meshes = meshlib.split_meshes(1, 1)
    # The random initialisation would be a second full copy of the params (and, at the paper's size, minutes
    # of compile): restoring a previous stage's params must never run it.
    inits = []
    random_init = steplib.init_params_jit
    monkeypatch.setattr(steplib, "init_params_jit", lambda *a: inits.append(1) or random_init(*a))
    like = setuplib.abstract_state(c, setup, meshes, 6)
    started = setuplib.initial_state(c, setup, meshes, 6)
    assert inits == []
    saved, _ = ckptlib.Checkpointer(workdir1).restore(like)
    assert jax.tree.structure(started) == jax.tree.structure(saved)
    for a, b in zip(jax.tree.leaves((started.client.params, started.server.params, started.client.batch_stats)),
                    jax.tree.leaves((saved.client.params, saved.server.params, saved.client.batch_stats))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Params only: the new stage starts at step 0 with its own fresh optimizer state, laid out as the template.
    assert int(started.step) == 0
    for x, t in zip(jax.tree.leaves((started.client.opt_state, started.server.opt_state)),
                    jax.tree.leaves((like.client.opt_state, like.server.opt_state))):
        assert (x.shape, x.dtype, x.sharding) == (t.shape, t.dtype, t.sharding) and not np.any(np.asarray(x))
    # The same state as the random initialisation followed by the restore (the path before), bit for bit.
    fresh = setuplib.create_state(c, setup, meshes, 6)
    assert inits == [1]
    before = setuplib.with_initial_params(c, setup, fresh)
    for a, b in zip(jax.tree.leaves(started), jax.tree.leaves(before)):
        assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A network split server builds only its partition: the client's params are not read.
    server_only = setuplib.initial_state(c, setup, meshes, 6, partitions=("server",))
    assert server_only.client == steplib.PartitionState({}, {}, {}) and inits == [1]
    for a, b in zip(jax.tree.leaves(server_only.server), jax.tree.leaves(started.server)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _leaves(tree):
    from qtl_jax import rules

    return {rules.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _saved_params(workdir):
    """The newest step's client and server params as saved (Orbax without a target)."""
    import orbax.checkpoint as ocp

    d = ckptlib.checkpoint_dir(workdir)
    step = max(int(x) for x in os.listdir(d) if x.isdigit())
    with ocp.StandardCheckpointer() as reader:
        return [_leaves(reader.restore(os.path.join(d, str(step), item)))
                for item in ("client_params", "server_params")]


def test_init_dont_load_starts_fresh_quantizers_on_a_16_bit_run(data_dir, tmp_path):
    """init.dont_load: a quantized run starts from a 16-bit run (whose checkpoint has no quantizer params),
    every other param loaded, the quantizers as this run's own initialisation draws them; a quantized run
    at another L is read with its quantizers dropped. Without the option, or with a typo, one clear error."""
    from qtl_jax.split import mesh as meshlib

    fp16 = str(tmp_path / "fp16")
    loop.train_and_evaluate(tiny(1, data_dir, **{"quantizer.bound": "none", "total_steps": 2,
                                                 "eval.enabled": False}), fp16)
    meshes = meshlib.split_meshes(1, 1)
    for source, levels in ((fp16, 4), (None, 8)):
        c = tiny(2, data_dir, **{"quantizer.levels": levels})
        if source is None:  # a quantized stage 1 of two steps at L=4, read at L=8
            source = str(tmp_path / "L4")
            loop.train_and_evaluate(tiny(1, data_dir, **{"total_steps": 2, "eval.enabled": False}), source)
        c.init.from_workdir = source
        setup = setuplib.build_setup(c, str(tmp_path / f"s{levels}"), jax.random.key_data(jax.random.key(0)))
        c.init.dont_load = ()
        fresh = setuplib.create_state(c, setup, meshes, 6)
        if levels == 4:
            with pytest.raises(ValueError, match="init.dont_load"):
                setuplib.initial_state(c, setup, meshes, 6)
        c.init.dont_load = (".*_quantizer/.*",)
        started = setuplib.initial_state(c, setup, meshes, 6)
        saved_client, saved_server = _saved_params(source)
        for part, got, want, init in (("client", started.client.params, saved_client, fresh.client.params),
                                      ("server", started.server.params, saved_server, fresh.server.params)):
            got, init = _leaves(got), _leaves(init)
            quantizer = {n for n in got if "_quantizer/" in n}
            assert quantizer and set(got) - quantizer == {n for n in want if "_quantizer/" not in n}
            for n in got:
                np.testing.assert_array_equal(got[n], init[n] if n in quantizer else want[n], err_msg=f"{part}/{n}")
        assert int(started.step) == 0
        c.init.dont_load = (".*_quantiser/.*",)
        with pytest.raises(ValueError, match="match no parameter"):
            setuplib.initial_state(c, setup, meshes, 6)


def test_stage2_starts_from_a_hugging_face_checkpoint(data_dir, tmp_path):
    from qtl_jax.models.tinyllava import init_params
    from qtl_jax.weights.export import export_llava_hf

    c = tiny(2, data_dir)
    reference = setuplib.build_setup(c, str(tmp_path), jax.random.key_data(jax.random.key(0)))
    tcfg = reference.model.model
    params = jax.jit(init_params, static_argnums=0)(tcfg, jax.random.key(3))
    export_llava_hf(tcfg, params, str(tmp_path / "hf"), image_token_index=tcfg.llm.vocab_size - 1)
    c.init.checkpoint = str(tmp_path / "hf")
    setup = setuplib.build_setup(c, str(tmp_path), jax.random.key_data(jax.random.key(0)))
    # The llava-hf checkpoint comes back in the Factory convention the split model and the pipeline use.
    assert setup.model.model.convention == "factory" and setup.model.model.image_token_index == -200
    assert setup.model.model.llm == tcfg.llm and setup.model.model.vision == tcfg.vision
    for a, b in zip(jax.tree.leaves(setup.pretrained), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_step_count_from_epochs():
    c = stage1.get_config()
    assert loop.count_steps(c, 558_128) == 558_128 // 64  # the paper's 1 epoch of LLaVA-Pretrain: 8720 steps
    c.data.num_epochs = 2
    assert loop.count_steps(c, 130) == 4
    c.total_steps = 7
    assert loop.count_steps(c, 130) == 7
    c.total_steps = -1
    with pytest.raises(ValueError, match="no full batch of global_batch_size=64"):
        loop.count_steps(c, 63)


def test_train_py_keeps_the_verbosity_asked_for(monkeypatch, tmp_path):
    """absl's ``--v=N`` / ``--verbosity=N`` keep their level; without them Orbax's INFO lines are silenced."""
    import importlib

    from absl import app, flags, logging

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(root)
    monkeypatch.setenv("QTL_JAX_NO_XLA_DEFAULTS", "1")  # main() must not touch this process's XLA_FLAGS
    train_cli = importlib.import_module("train")
    seen = []
    monkeypatch.setattr(loop, "train_and_evaluate", lambda config, workdir: seen.append(logging.get_verbosity()))
    before = logging.get_verbosity()
    try:
        for extra in (["--v=1"], ["--verbosity=2"], ["-v", "0"], []):
            flags.FLAGS.unparse_flags()
            with pytest.raises(SystemExit) as done:  # app.run exits with main's result
                app.run(train_cli.main, argv=["train.py", f"--config={root}/configs/stage1.py:tiny",
                                              f"--workdir={tmp_path}", *extra])
            assert done.value.code is None
    finally:
        flags.FLAGS.unparse_flags()
        flags.FLAGS.mark_as_parsed()
        logging.set_verbosity(before)
    assert seen == [1, 2, 0, logging.WARNING]


@pytest.mark.parametrize("mode", ["split", "fused"])
def test_each_steps_metrics_are_read_after_the_next_step_is_queued(data_dir, tmp_path, monkeypatch, mode):
    """The loop queues step k+1 before it reads step k's metrics (so the devices never wait for the host
    between steps), reads each step's exactly once, and still reads the last before its checkpoint."""
    from qtl_jax.split import step as steplib

    events = []
    make, read = steplib.make_train_step, steplib.host_metrics

    def make_spy(*args, **kwargs):
        assert kwargs.get("defer_metrics") is True
        inner = make(*args, **kwargs)

        def step(state, batch):
            out = inner(state, batch)
            assert "loss" not in out[1] and isinstance(out[1]["ce"], jax.Array)  # not read yet
            events.append("step")
            return out
        return step

    def read_spy(metrics):
        events.append("read")
        return read(metrics)

    monkeypatch.setattr(steplib, "make_train_step", make_spy)
    monkeypatch.setattr(steplib, "host_metrics", read_spy)
    c = tiny(1, data_dir, total_steps=4, checkpoint_every=4, **{"eval.enabled": False, "split.mode": mode})
    if mode == "fused":  # one program on one mesh
        c.mesh.client_devices = c.mesh.server_devices = 0
    result = loop.train_and_evaluate(c, str(tmp_path / "w"))
    assert events == ["step", "step", "read", "step", "read", "step", "read", "read"]
    logged = read_jsonl(str(tmp_path / "w" / "metrics.jsonl"))
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in logged)
    assert result["loss"] == logged[-1]["loss"]


def test_packed_training_runs_with_the_samples_of_unpacked_batches(data_dir, tmp_path, capsys):
    """data.pack: the loop packs each global batch into rows (logged as a new shape), every step still trains
    global_batch_size samples; a remote server half refuses it in one clear error before anything is built."""
    c = tiny(2, data_dir, **{"data.pack": True, "total_steps": 2, "eval.enabled": False})
    result = loop.train_and_evaluate(c, str(tmp_path / "packed"))
    records = read_jsonl(str(tmp_path / "packed" / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2] and np.isfinite(result["loss"])
    assert all(r["examples"] == c.global_batch_size and r["uplink_bytes_side"] > 0 for r in records)
    out = capsys.readouterr().out
    assert "rows x tokens x merged positions of the packed rows" in out
    c.split.server.address = "127.0.0.1:1"
    with pytest.raises(ValueError, match="data.pack=True"):
        loop.train_and_evaluate(c, str(tmp_path / "remote"))
