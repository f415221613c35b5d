"""SplitFed over gRPC on 127.0.0.1: three clients, one server partition, client models averaged every K
steps through the server (``qtl_jax.split.fedavg``), a crashed client dropped from its round and rejoining.

The tiny model and helpers of ``test_grpc_split``; the server runs in a thread of this process, each
client is a ``GrpcServerHalf`` with its own client partition and its own batches. Uploads of one round
come from one thread per client (the ``Average`` RPC blocks until the round is complete).
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import grpc
import jax
import numpy as np
import pytest

from qtl_jax.split import fedavg
from qtl_jax.split import server as serverlib
from qtl_jax.split import step as steplib
from qtl_jax.split import wire
from qtl_jax.split.grpc_link import GrpcServerHalf
from qtl_jax.split.proto import split_pb2 as pb
from qtl_jax.split.proto import split_pb2_grpc as pb_grpc
from test_grpc_split import (CONFIG, GEOMETRY, MESHES, PROGRAMS, RPC_TIMEOUT, Server, assert_trees_equal,
                             expect_error, fresh_state, good_request, halves, make_batch)
from tolerances import rounding_tolerance

CLIENTS = ("a", "b", "c")
K = 2
WEIGHTS = {"a": 1, "b": 2, "c": 5}  # unequal, so the weighting shows in the average


def batch(client: str, step: int) -> dict[str, np.ndarray]:
    """Each client's own data: batches no other client sees."""
    return make_batch(100 * (CLIENTS.index(client) + 1) + step)


def template():
    state, optimizers = fresh_state()
    return fedavg.template_of(fedavg.averaged_leaves(state.client, optimizers.client_frozen))


def fedavg_server(timeout_s: float = RPC_TIMEOUT) -> Server:
    options = serverlib.ServerOptions(clients=CLIENTS, fedavg_every=K, fedavg_timeout_s=timeout_s,
                                      max_workers=8)
    server = Server.__new__(Server)
    full, optimizers = fresh_state()
    _, server_state = halves(full)
    server.servicer = serverlib.SplitServicer(CONFIG, server_state, optimizers, MESHES.server, GEOMETRY, options,
                                              update=PROGRAMS.server_update, client_template=template())
    from qtl_jax.split import security as seclib

    server.security = seclib.SecurityConfig()
    server.grpc_server, server.port = serverlib.serve(server.servicer, "127.0.0.1:0", server.security)
    server.target = f"127.0.0.1:{server.port}"
    return server


def link(server: Server, client: str) -> GrpcServerHalf:
    return GrpcServerHalf(server.target, GEOMETRY, client_id=client, timeout_s=RPC_TIMEOUT, fedavg_every=K)


def average_together(links, states, round_, clients) -> dict[str, fedavg.Average]:
    """``clients`` upload round ``round_`` at once (a thread each); their states take the average."""
    results, errors = {}, []

    def one(c):
        try:
            client, avg = fedavg.client_round(links[c], round_, states[c].client, PROGRAMS.optimizers.client_frozen,
                                              WEIGHTS[c])
            results[c] = (client, avg)
        except Exception as e:  # re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(RPC_TIMEOUT)
    assert not errors, errors
    for c in clients:
        states[c] = states[c].replace(client=results[c][0])
    return {c: results[c][1] for c in clients}


def expected_average(pre: dict[str, dict[str, np.ndarray]], clients) -> dict[str, np.ndarray]:
    """The example-weighted mean of the uploaded leaves, computed here with numpy's weighted average."""
    return {name: np.average(np.stack([pre[c][name].astype(np.float64) for c in clients]), axis=0,
                             weights=[WEIGHTS[c] for c in clients])
            for name in pre[clients[0]]}


def assert_close_to(got: dict[str, np.ndarray], want: dict[str, np.ndarray]):
    """Equal up to the rounding of a 3-term float sum and one cast to float32 (both sides accumulate in float64)."""
    assert set(got) == set(want)
    for name, w in want.items():
        tol = rounding_tolerance(np.float32, len(CLIENTS), scale=float(np.max(np.abs(w))) + 1e-30)
        np.testing.assert_allclose(np.asarray(got[name], np.float64), w, rtol=0, atol=tol, err_msg=name)


ORDER = [(c, s) for s in range(2 * K) for c in CLIENTS]  # the server's steps, in this order


def closes_round(i: int, s: int) -> bool:
    """Whether the ``i``-th step of ORDER (client step ``s``) is the last one before a round."""
    return (i + 1) % len(CLIENTS) == 0 and (s + 1) % K == 0


@pytest.fixture(scope="module")
def networked():
    """Two rounds of K=2 steps for clients a, b, c over gRPC (own data, own client partition, weights 1, 2,
    5): per-step losses, each round's uploads (before) and adopted models (after), the averages, the end."""
    frozen = PROGRAMS.optimizers.client_frozen
    server = fedavg_server()
    try:
        links = {c: link(server, c) for c in CLIENTS}
        assert all(links[c].join(0) == 0 for c in CLIENTS)
        states = {c: halves(fresh_state()[0])[0] for c in CLIENTS}
        losses, rounds = [], []
        for i, (c, s) in enumerate(ORDER):
            states[c], metrics = PROGRAMS.client_step(links[c])(states[c], batch(c, s))
            losses.append(float(metrics["loss"]))
            if closes_round(i, s):
                pre = {c: fedavg.averaged_leaves(states[c].client, frozen) for c in CLIENTS}
                averages = average_together(links, states, s + 1, CLIENTS)
                after = {c: fedavg.averaged_leaves(states[c].client, frozen) for c in CLIENTS}
                rounds.append((pre, averages, after))
        # A retry of a completed round (a lost reply) gets the same average and changes nothing.
        retry = fedavg.client_round(links["b"], 2 * K, states["b"].client, frozen, WEIGHTS["b"])[1]
        for lk in links.values():
            lk.close()
        yield dict(losses=losses, rounds=rounds, states=jax.device_get(states), retry=retry,
                   server=jax.device_get(server.servicer.state.server), client_steps=server.servicer.client_steps(),
                   history=list(server.servicer.rounds.history))
    finally:
        server.stop()


def test_three_clients_hold_the_example_weighted_average_after_each_round(networked):
    """After each round every client holds the same client model: the example-weighted average of the
    three uploads (computed here with numpy); optimizer states stay each client's own; retries replay."""
    assert len(networked["rounds"]) == 2
    for j, (pre, averages, after) in enumerate(networked["rounds"]):
        # Each client trained on its own data: the models differ before the average.
        assert any(not np.array_equal(pre["a"][n], pre["b"][n]) for n in pre["a"])
        for c in CLIENTS:
            assert averages[c].round == (j + 1) * K and averages[c].members == CLIENTS
            assert averages[c].examples == sum(WEIGHTS.values()) and not averages[c].replayed
        for c in CLIENTS[1:]:
            assert_trees_equal(after[c], after["a"])
        assert_close_to(after["a"], expected_average(pre, CLIENTS))
    states = networked["states"]
    # The optimizer state stays each client's own (local Adam moments).
    moments = [np.asarray(jax.tree_util.tree_leaves(states[c].client.opt_state)[1]) for c in "ab"]
    assert not np.array_equal(*moments)
    assert networked["client_steps"] == {c: 2 * K for c in CLIENTS}
    assert [h[:2] for h in networked["history"]] == [(K, CLIENTS), (2 * K, CLIENTS)]
    retry = networked["retry"]
    assert retry.replayed and retry.round == 2 * K and retry.members == CLIENTS
    assert_trees_equal(retry.leaves, networked["rounds"][-1][2]["a"])


@pytest.mark.slow
def test_three_clients_over_grpc_equal_an_in_process_simulation(networked):
    """The same run in process (one server partition, the client partition swapped per step,
    fedavg.weighted_average at each round): losses, every client partition and the server partition
    bit for bit. (Slow: it compiles the in-process split step.)"""
    in_process_step = steplib.make_train_step(CONFIG, MESHES, PROGRAMS.optimizers, mode="split")
    frozen = PROGRAMS.optimizers.client_frozen
    init, _ = fresh_state()
    # Each client its own buffers: the step donates the client partition it is given.
    server_part, clients, losses = init.server, {c: fresh_state()[0].client for c in CLIENTS}, []
    for i, (c, s) in enumerate(ORDER):
        state, metrics = in_process_step(init.replace(step=init.step + s, client=clients[c], server=server_part),
                                         batch(c, s))
        clients[c], server_part = state.client, state.server
        losses.append(float(metrics["loss"]))
        if closes_round(i, s):
            average = fedavg.weighted_average([(WEIGHTS[c], fedavg.averaged_leaves(clients[c], frozen))
                                               for c in CLIENTS])
            clients = {c: fedavg.with_leaves(clients[c], average) for c in CLIENTS}
    assert networked["losses"] == losses
    for c in CLIENTS:
        assert_trees_equal(networked["states"][c].client, jax.device_get(clients[c]))
    assert_trees_equal(networked["server"].params, jax.device_get(server_part.params))


def test_a_crashed_client_is_dropped_from_its_round_and_rejoins_from_its_checkpoint():
    """Client c saves its state after round K, applies one more step and dies before the next round.
    a and b are not held up: their round completes when its deadline passes, without c, and their next
    steps are served. c restarts from its checkpoint: Join tells it the server's step for it (no rewind of
    the shared server), it skips ahead, gets the round it missed (a and b's average) and joins the next
    round with everyone."""
    frozen = PROGRAMS.optimizers.client_frozen
    server = fedavg_server(timeout_s=3.0)  # a bound on the wait for a dead client, not a sleep
    try:
        links = {c: link(server, c) for c in CLIENTS}
        states = {c: halves(fresh_state()[0])[0] for c in CLIENTS}

        def steps(clients, s):
            for c in clients:
                states[c], _ = PROGRAMS.client_step(links[c])(states[c], batch(c, s))

        for s in range(K):
            steps(CLIENTS, s)
        average_together(links, states, K, CLIENTS)
        checkpoint = jax.device_get(states["c"])  # c's checkpoint of step K, after the average
        steps(CLIENTS, K)  # c's step K reaches the server, then c dies
        links["c"].close()
        for s in range(K + 1, 2 * K):
            steps("ab", s)
        second = average_together(links, states, 2 * K, "ab")
        assert second["a"].members == ("a", "b") and second["a"].examples == WEIGHTS["a"] + WEIGHTS["b"]
        assert server.servicer.rounds.history[-1] == (2 * K, ("a", "b"), ("c",))
        assert_close_to(fedavg.averaged_leaves(states["a"].client, frozen),
                        expected_average({c: fedavg.averaged_leaves(states[c].client, frozen) for c in "ab"}, "ab"))
        steps("ab", 2 * K)  # the others go on: no turn order waits for c

        # c restarts from its checkpoint of step K: the server is at step K + 1 for it and does not rewind.
        links["c"] = link(server, "c")
        assert links["c"].join(K) == K + 1 and not server.servicer.rewinds
        restarted = jax.tree_util.tree_map(lambda x: x, checkpoint)
        # (train_and_evaluate skips its data to that step; here the steps of c run again up to the round)
        restarted = restarted.replace(step=np.int32(K + 1))
        states["c"] = restarted
        for s in range(K + 1, 2 * K):
            steps("c", s)
        late = fedavg.client_round(links["c"], 2 * K, states["c"].client, frozen, WEIGHTS["c"])
        states["c"] = states["c"].replace(client=late[0])
        assert late[1].replayed and late[1].members == ("a", "b")
        assert_trees_equal(fedavg.averaged_leaves(states["c"].client, frozen), second["a"].leaves)
        # A fetch (a client restarting between rounds) gets the newest average.
        newest = links["c"].average(0, {}, examples=0, fetch=True)
        assert newest.round == 2 * K and newest.members == ("a", "b")
        steps("c", 2 * K)
        for s in range(2 * K + 1, 3 * K):
            steps(CLIENTS, s)
        third = average_together(links, states, 3 * K, CLIENTS)
        assert third["c"].members == CLIENTS and not server.servicer.rounds.absent
        assert server.servicer.client_steps() == {c: 3 * K for c in CLIENTS}
        for lk in links.values():
            lk.close()
    finally:
        server.stop()


def test_bad_uploads_and_mismatched_peers_get_clear_errors_and_steps_need_no_turn():
    """Each malformed upload is refused with its status and a message naming the problem, and starts no
    round; a client and a server with different K are refused at Join; steps go in arrival order."""
    server = fedavg_server()
    plain = Server(options=serverlib.ServerOptions(clients=("a", "b")))
    try:
        stub = pb_grpc.SplitLearningStub(link(server, "a").channel)
        leaves = fedavg.averaged_leaves(fresh_state()[0].client, PROGRAMS.optimizers.client_frozen)

        def request(**kw):
            fields = dict(protocol_version=wire.PROTOCOL_VERSION, client_id="a", round=K, examples=1,
                          tensors=fedavg.to_tensors(leaves))
            fields.update(kw)
            return pb.AverageRequest(**fields)

        call = lambda r: stub.Average(r, timeout=RPC_TIMEOUT)  # noqa: E731
        expect_error(grpc.StatusCode.FAILED_PRECONDITION, call, request(protocol_version=2),
                     match=f"protocol_version=2, but this side speaks version {wire.PROTOCOL_VERSION}")
        expect_error(grpc.StatusCode.PERMISSION_DENIED, call, request(client_id="z"), match="not one of")
        expect_error(grpc.StatusCode.FAILED_PRECONDITION, call, request(), match="applied only 0 of its steps")
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, call, request(round=K + 1),
                     match="positive multiples of fedavg_every=2")
        wrong = fedavg.to_tensors({**leaves, "params/connector/fc_0/bias": np.zeros(3, np.float32)})
        server.servicer.set_client_steps({"a": K})
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, call, request(tensors=wrong),
                     match="'params/connector/fc_0/bias' is float32[3], the server's client model has float32[16]")
        nan = fedavg.to_tensors({**leaves, "params/connector/fc_0/bias": np.full(16, np.nan, np.float32)})
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, call, request(tensors=nan), match="non-finite")
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, call, request(tensors=fedavg.to_tensors(leaves)[1:]),
                     match="lacks 1 of the client model's tensors")
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, call, request(examples=0), match="weight must be >= 1")
        assert server.servicer.rounds.state_sizes() == {"pending_rounds": 0, "cached_rounds": 0, "history": 0}
        # A client and a server with different K (or none) are refused at Join, naming both.
        with pytest.raises(grpc.RpcError) as info:
            GrpcServerHalf(server.target, GEOMETRY, client_id="a", timeout_s=RPC_TIMEOUT).join(0)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "every 0 steps (split.fedavg_every; 0: never), this server every 2" in info.value.details()
        with pytest.raises(grpc.RpcError, match="this server every 0"):
            GrpcServerHalf(plain.target, GEOMETRY, client_id="a", timeout_s=RPC_TIMEOUT, fedavg_every=K).join(0)
        expect_error(grpc.StatusCode.FAILED_PRECONDITION, pb_grpc.SplitLearningStub(link(plain, "a").channel).Average,
                     request(), match="does not average client models")
        # Steps: no turn order (b may go before a), each client's steps exactly once and in its own order.
        step = lambda r: stub.Step(r, timeout=RPC_TIMEOUT)  # noqa: E731
        expect_error(grpc.StatusCode.FAILED_PRECONDITION, step, good_request(1, "b"),
                     match="step 1 is out of order: the server applies step 0 next")
        first = step(good_request(0, "b"))
        again = step(good_request(0, "b"))
        assert not first.replayed and again.replayed and again.image_grad == first.image_grad
        assert server.servicer.client_steps() == {"a": K, "b": 1, "c": 0} and server.servicer.step == 1
    finally:
        server.stop()
        plain.stop()


def test_options_and_averages_named_errors():
    with pytest.raises(ValueError, match="list them in clients"):
        serverlib.ServerOptions(fedavg_every=2)
    with pytest.raises(ValueError, match="fedavg_every must be >= 0"):
        serverlib.ServerOptions(clients=CLIENTS, fedavg_every=-1)
    with pytest.raises(ValueError, match="weights sum to 0"):
        fedavg.weighted_average([(0, {"x": np.ones(2, np.float32)})])
    # Frozen params do not travel; the ema statistics' float leaves do, their integer count does not.
    state, optimizers = fresh_state()
    frozen = jax.tree_util.tree_map(lambda _: True, optimizers.client_frozen)
    frozen["connector"]["fc_0"]["bias"] = False
    names = sorted(fedavg.averaged_leaves(state.client, frozen))
    assert names == ["batch_stats/text_quantizer/mean", "batch_stats/text_quantizer/var", "params/connector/fc_0/bias"]


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_command_lines_three_clients_one_killed_and_restarted(tmp_path):
    """The server and three client processes (tiny config, K=2, 6 steps each): client c is SIGKILLed
    after its step 3 (its checkpoint: step 2) and restarted. It rejoins at the server's step for it
    and the last round is averaged over all three; all four processes finish."""
    from test_grpc_split import ROOT, free_port, losses, wait_for

    timeout = 1200  # four processes compiling at once on two shared cores

    port = free_port()
    common = ["--config=configs/stage1.py:tiny", "--config.eval.enabled=False", "--config.checkpoint_every=2",
              "--config.split.fedavg_every=2", "--config.split.fedavg_timeout_s=300", f"--address=127.0.0.1:{port}"]
    logs = {name: tmp_path / f"{name}.log" for name in ("server", "a", "b", "c")}

    def launch(name, *extra):
        module = "qtl_jax.split.server" if name == "server" else "qtl_jax.split.client"
        with open(logs[name], "a") as log:
            return subprocess.Popen([sys.executable, "-m", module, *common, f"--workdir={tmp_path / name}", *extra],
                                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)

    seeds = {"a": 0, "b": 1, "c": 2}
    client = lambda c, *x: launch(c, f"--client_id={c}", f"--config.data.shapes.seed={seeds[c]}", *x)  # noqa: E731
    procs = [launch("server", "--clients=a,b,c"), client("a"), client("b"),
             client("c", "--config.debug.step_delay=1.0")]
    try:
        wait_for(lambda: 3 in losses(tmp_path / "c"), "client c's step 3", timeout)
        procs[3].kill()
        procs[3].wait(10)
        procs.append(client("c"))
        for p in procs[1:3] + procs[4:]:
            assert p.wait(timeout=timeout) == 0, {n: logs[n].read_text()[-2000:] for n in logs}
        assert procs[0].wait(timeout=120) == 0, logs["server"].read_text()[-3000:]
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
    text = {n: logs[n].read_text() for n in logs}
    assert "qtl_jax.split.server: done at step 18" in text["server"]
    # c was killed after its step 3, before or after sending step 4: the server had 3 or 4 of its steps.
    assert "resumed" in text["c"] and re.search(r"rejoined at the server's step [34] for this client \(from step 2\)",
                                                 text["c"])
    for c in "abc":
        assert "FedAvg round 6: 3 clients (a, b, c)" in text[c], text[c][-2000:]
    assert sorted(losses(tmp_path / "a")) == sorted(losses(tmp_path / "b")) == list(range(1, 7))
    assert {1, 2, 6} <= set(losses(tmp_path / "c"))
