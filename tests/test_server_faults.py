"""Hostile but authenticated peers against a live split server on 127.0.0.1 (issue 16).

What a peer holding the token can make the server do, checked on a real gRPC server in this process
(the tiny model and its compiled programs of ``test_grpc_split``):

* bounded state: oversized or malformed client ids, tokens and metadata are refused with a clear status
  and leave nothing behind; the step history, the replay cache and the ids held stay bounded however
  many steps are applied;
* bytes that are not protobuf: ``INVALID_ARGUMENT`` naming the message type, one rate-limited log line
  for many such requests and no traceback;
* the rewind policy: with several clients nobody rolls the server back; a single-client server rewinds
  only for its own client, moves the later checkpoints aside (never deletes them), and answers
  ``DATA_LOSS`` (staying where it is) when the checkpoint to rewind to is corrupt;
* exactly one ``authorization`` entry, on the real split service;
* a hypothesis fuzz of request parsing (raw bytes and mutations of a valid request): every request gets
  an answer or a refusal with an expected status, never ``INTERNAL``/``UNKNOWN``, and the server keeps
  serving. The default run is bounded; ``-m slow`` runs the long one.
"""

from __future__ import annotations

import glob
import logging
import os

import grpc
import jax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtl_jax.split import guard
from qtl_jax.split import security as seclib
from qtl_jax.split import server as serverlib
from qtl_jax.split import wire
from qtl_jax.split.proto import split_pb2 as pb
from qtl_jax.split.proto import split_pb2_grpc as pb_grpc
from qtl_jax.train import checkpoint as ckptlib
from test_grpc_split import GEOMETRY, RPC_TIMEOUT, Server, assert_trees_equal, good_request

TOKEN = "s3cret-token"
MD = (("authorization", f"Bearer {TOKEN}"),)
HISTORY = 3
MAX_MESSAGE = 4 << 20
LOGGER = "qtl_jax.split.server"
# What a request may get back: an answer, or one of the refusals the server documents (never INTERNAL or
# UNKNOWN, which would be an exception the server did not expect).
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}


def make_server(checkpointer=None, **options) -> Server:
    options.setdefault("max_message_bytes", MAX_MESSAGE)
    options.setdefault("history", HISTORY)
    options.setdefault("log_interval_s", 3600.0)  # one line per kind of refusal for the whole test
    return Server(security=seclib.SecurityConfig(token=TOKEN), options=serverlib.ServerOptions(**options),
                  checkpointer=checkpointer)


@pytest.fixture(scope="module")
def live():
    server = make_server()
    channel = grpc.insecure_channel(server.target)
    yield server, pb_grpc.SplitLearningStub(channel), channel
    channel.close()
    server.stop()


def refusal(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, timeout=RPC_TIMEOUT, **kwargs)
    return info.value


def join_request(client_id: str, client_step: int) -> pb.JoinRequest:
    return pb.JoinRequest(protocol_version=wire.PROTOCOL_VERSION, client_id=client_id, client_step=client_step,
                          geometry=GEOMETRY.to_proto())


def raw_method(channel, name: str):
    """The RPC ``name`` sending bytes as they are (what a peer that does not speak protobuf sends)."""
    return channel.unary_unary(f"/{serverlib.SERVICE}/{name}", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)


# ---------------------------------------------------------------------------------------------------
# Bounded state


def test_oversized_and_malformed_client_ids_are_refused_and_leave_nothing(live):
    server, stub, _ = live
    step, sizes = server.servicer.step, server.servicer.state_sizes()
    huge = "x" * (1 << 20)  # the probe sent 20 MiB ids; 1 MiB fits this server's 4 MiB messages
    for client_id in (huge, "a" * (guard.MAX_CLIENT_ID_BYTES + 1), "", "bad\nid", "évé", "a b"):
        for call in (lambda: stub.Step(good_request(step, client_id=client_id), metadata=MD, timeout=RPC_TIMEOUT),
                     lambda: stub.Join(join_request(client_id, step), metadata=MD, timeout=RPC_TIMEOUT)):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            details = info.value.details()
            assert "a client id is 1 to 64 characters" in details and len(details) < 300, details
    assert f"({1 << 20} characters)" in refusal(stub.Step, good_request(step, client_id=huge), metadata=MD).details()
    assert server.servicer.step == step and server.servicer.state_sizes() == sizes
    # The longest id allowed is served.
    longest = "L" * guard.MAX_CLIENT_ID_BYTES
    fresh = make_server()
    try:
        with grpc.insecure_channel(fresh.target) as channel:
            reply = pb_grpc.SplitLearningStub(channel).Step(good_request(0, client_id=longest), metadata=MD,
                                                            timeout=RPC_TIMEOUT)
        assert reply.step == 0 and fresh.servicer.client_id == longest
    finally:
        fresh.stop()


def test_state_kept_per_request_stays_bounded_over_many_steps(live):
    server, stub, _ = live
    for _ in range(HISTORY + 3):
        step = server.servicer.step
        assert stub.Step(good_request(step), metadata=MD, timeout=RPC_TIMEOUT).step == step
        assert stub.Step(good_request(step), metadata=MD, timeout=RPC_TIMEOUT).replayed  # a retry: kept once
    sizes = server.servicer.state_sizes()
    assert sizes == {"applied_steps": HISTORY, "applied_by": HISTORY, "rewinds": 0, "cached_replies": 1,
                     "client_id_bytes": (HISTORY + 1) * len("tester")}
    assert list(server.servicer.applied_steps) == list(range(server.servicer.step - HISTORY, server.servicer.step))


def test_oversized_token_and_metadata_are_refused_before_the_service(live):
    server, stub, _ = live
    step, sizes = server.servicer.step, server.servicer.state_sizes()
    max_metadata = server.servicer.options.max_metadata_bytes
    # Above the server's metadata limit: gRPC refuses the call before the interceptor or the service.
    for metadata in ((("authorization", "Bearer " + "t" * (4 * max_metadata)),),
                     MD + (("x-padding", "p" * (4 * max_metadata)),),
                     MD + tuple((f"x-many-{i}", "v" * 64) for i in range(4 * max_metadata // 64))):
        error = refusal(stub.Step, good_request(step), metadata=metadata)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
    # A long wrong token below the limit is just a wrong token.
    error = refusal(stub.Step, good_request(step), metadata=(("authorization", "Bearer " + "t" * 4096),))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and len(error.details()) < 300
    # Two authorization entries, right then wrong or wrong then right: refused by the real service too.
    wrong = (("authorization", "Bearer guess"),)
    for metadata in (MD + wrong, wrong + MD, MD + MD):
        error = refusal(stub.Step, good_request(step), metadata=metadata)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "more than one 'authorization'" in error.details()
    assert server.servicer.step == step and server.servicer.state_sizes() == sizes
    assert stub.Step(good_request(step), metadata=MD, timeout=RPC_TIMEOUT).step == step


# ---------------------------------------------------------------------------------------------------
# Bytes that are not protobuf


def test_malformed_protobuf_is_invalid_argument_with_one_log_line(caplog):
    server = make_server()
    try:
        with grpc.insecure_channel(server.target) as channel, caplog.at_level(logging.INFO):
            good = good_request(0).SerializeToString()
            garbage = [good[:-9], b"\xff" * 40, good[:17] + b"\x80", bytes([0x0A, 0x7F]) + b"ab"]
            for name, type_name in (("Step", "UplinkRequest"), ("Join", "JoinRequest")):
                send = raw_method(channel, name)
                for i in range(20):
                    error = refusal(send, garbage[i % len(garbage)], metadata=MD)
                    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
                    assert f"is not a valid qtl_jax.split.v1.{type_name} protobuf message" in error.details()
            assert server.servicer.step == 0
            # The server still serves, and a valid step is not logged.
            assert pb_grpc.SplitLearningStub(channel).Step(good_request(0), metadata=MD,
                                                           timeout=RPC_TIMEOUT).step == 0
    finally:
        server.stop()
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    ours = [r.getMessage() for r in lines if r.name == LOGGER]
    assert len(ours) == 2, ours  # one per method over 40 requests, within the interval
    assert ours[0].startswith("qtl_jax.split.server: refused a Step request: INVALID_ARGUMENT: the request (")
    assert ours[1].startswith("qtl_jax.split.server: refused a Join request: INVALID_ARGUMENT: the request (")
    assert all(r.exc_info is None and "Traceback" not in r.getMessage() for r in lines)
    assert not [r for r in lines if r.name != LOGGER], [r.getMessage() for r in lines]


def test_rate_limited_log_counts_what_it_left_out():
    now, written = [0.0], []
    log = guard.RateLimitedLog(written.append, interval_s=60.0, clock=lambda: now[0])
    assert log("a", "first") and not log("a", "second") and log("b", "other kind")
    now[0] = 59.0
    assert not log("a", "third")
    now[0] = 61.0
    assert log("a", "fourth") and not log("a", "fifth")
    assert written == ["first", "other kind", "fourth (2 more like it in the last 61 s not logged)"]
    with pytest.raises(ValueError, match="interval_s must be >= 0"):
        guard.RateLimitedLog(written.append, interval_s=-1)


# ---------------------------------------------------------------------------------------------------
# Rewind policy


def checkpointed_server(tmp_path, **options):
    checkpointer = ckptlib.Checkpointer(str(tmp_path / "server"), keep=10)
    return make_server(checkpointer, checkpoint_every=1, **options), checkpointer


def rewound_dirs(checkpointer) -> list[str]:
    return sorted(os.path.basename(p) for p in checkpointer.moved_aside(serverlib.REWOUND_SUFFIX))


def test_with_several_clients_no_peer_rolls_the_server_back(tmp_path, caplog):
    server, checkpointer = checkpointed_server(tmp_path, clients=("a", "b"))
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.SplitLearningStub(channel)
            for local in range(2):
                for c in "ab":
                    assert stub.Step(good_request(local, c), metadata=MD, timeout=RPC_TIMEOUT).step == local
            checkpointer.wait()
            saved, params = checkpointer.all_steps(), jax.device_get(server.servicer.state.server.params)
            assert server.servicer.step == 4 and saved == [1, 2, 3, 4]
            with caplog.at_level(logging.WARNING, logger=LOGGER):
                # a "lost its state" and joins at step 0 (a checkpoint the server has): it is told its own step.
                assert stub.Join(join_request("a", 0), metadata=MD, timeout=RPC_TIMEOUT).server_step == 2
                assert stub.Join(join_request("b", 1), metadata=MD, timeout=RPC_TIMEOUT).server_step == 2
            # A peer that is not one of the clients cannot even join.
            error = refusal(stub.Join, join_request("c", 0), metadata=MD)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "not one of" in error.details()
        assert server.servicer.step == 4 and not server.servicer.rewinds
        assert checkpointer.all_steps() == saved and rewound_dirs(checkpointer) == []
        assert_trees_equal(jax.device_get(server.servicer.state.server.params), params)
        notes = [r.getMessage() for r in caplog.records if r.name == LOGGER and "not rewinding" in r.getMessage()]
        assert len(notes) == 1 and "not rewinding (several clients share this server" in notes[0], notes
    finally:
        server.stop()
        checkpointer.close()


def test_single_client_rewinds_only_for_its_own_client_and_keeps_checkpoints(tmp_path):
    server, checkpointer = checkpointed_server(tmp_path)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.SplitLearningStub(channel)
            assert stub.Join(join_request("owner", 0), metadata=MD, timeout=RPC_TIMEOUT).server_step == 0
            for s in range(3):
                stub.Step(good_request(s, "owner"), metadata=MD, timeout=RPC_TIMEOUT)
            checkpointer.wait()
            assert checkpointer.all_steps() == [1, 2, 3]
            # Another authenticated peer asks for a rewind: refused, nothing moves.
            error = refusal(stub.Join, join_request("intruder", 1), metadata=MD)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "serves client 'owner'" in error.details()
            assert server.servicer.step == 3 and checkpointer.all_steps() == [1, 2, 3]
            # The owner restarts from its step-1 checkpoint: the server goes back; 2 and 3 are moved aside.
            assert stub.Join(join_request("owner", 1), metadata=MD, timeout=RPC_TIMEOUT).server_step == 1
            assert server.servicer.step == 1 and list(server.servicer.rewinds) == [(3, 1)]
            assert checkpointer.all_steps() == [1] and rewound_dirs(checkpointer) == ["2.rewound", "3.rewound"]
            # Training continues; the replayed steps save under their numbers, the moved ones stay.
            for s in (1, 2):
                assert stub.Step(good_request(s, "owner"), metadata=MD, timeout=RPC_TIMEOUT).step == s
            checkpointer.wait()
            assert checkpointer.all_steps() == [1, 2, 3] and rewound_dirs(checkpointer) == ["2.rewound", "3.rewound"]
    finally:
        server.stop()
        checkpointer.close()


def test_rewind_never_and_the_bound_on_moved_checkpoints(tmp_path):
    server, checkpointer = checkpointed_server(tmp_path, rewind="never")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.SplitLearningStub(channel)
            for s in range(2):
                stub.Step(good_request(s), metadata=MD, timeout=RPC_TIMEOUT)
            checkpointer.wait()
            assert stub.Join(join_request("tester", 1), metadata=MD, timeout=RPC_TIMEOUT).server_step == 2
            assert server.servicer.step == 2 and checkpointer.all_steps() == [1, 2]
        # Under own_client, a rewind that would leave more than max_rewound moved-aside checkpoints is
        # refused until an operator clears them.
        server.servicer.options = serverlib.ServerOptions(rewind="own_client", max_rewound=1,
                                                          max_message_bytes=MAX_MESSAGE)
        os.makedirs(os.path.join(checkpointer.directory, "7" + serverlib.REWOUND_SUFFIX))
        with grpc.insecure_channel(server.target) as channel:
            error = refusal(pb_grpc.SplitLearningStub(channel).Join, join_request("tester", 1), metadata=MD)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "operator must move" in error.details()
        assert server.servicer.step == 2 and checkpointer.all_steps() == [1, 2]
    finally:
        server.stop()
        checkpointer.close()


def test_rewind_to_a_corrupt_checkpoint_is_data_loss_and_the_server_stays(tmp_path):
    server, checkpointer = checkpointed_server(tmp_path)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.SplitLearningStub(channel)
            for s in range(2):
                stub.Step(good_request(s), metadata=MD, timeout=RPC_TIMEOUT)
            checkpointer.wait()
            params = jax.device_get(server.servicer.state.server.params)
            # 64 flipped bytes in the middle of each data file of the server parameters (Orbax may have
            # merged the process's OCDBT database into the item's own d/ or not: damage both).
            item = os.path.join(checkpointer.directory, "1", "server_params")
            files = glob.glob(os.path.join(item, "d", "*")) + glob.glob(os.path.join(item, "ocdbt.process_*", "d", "*"))
            assert files
            for name in files:
                with open(name, "r+b") as fh:
                    data = bytearray(fh.read())
                    middle = len(data) // 2
                    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
                    fh.seek(0)
                    fh.write(data)
            assert not checkpointer.is_intact(1)
            error = refusal(stub.Join, join_request("tester", 1), metadata=MD)
            assert error.code() == grpc.StatusCode.DATA_LOSS, error.details()
            details = error.details()
            assert "cannot rewind to its checkpoint of step 1" in details and "stays at step 2" in details
            assert "\n" not in details
            # Nothing moved; the server goes on from step 2.
            assert server.servicer.step == 2 and checkpointer.all_steps() == [1, 2] and not server.servicer.rewinds
            assert_trees_equal(jax.device_get(server.servicer.state.server.params), params)
            assert stub.Step(good_request(2), metadata=MD, timeout=RPC_TIMEOUT).step == 2
    finally:
        server.stop()
        checkpointer.close()


# ---------------------------------------------------------------------------------------------------
# Fuzz: request parsing


class Aborted(Exception):
    pass


class FakeContext:
    def abort(self, code, details):
        raise Aborted(code, details)


@pytest.fixture(scope="module")
def handlers(live):
    """The server's Join and Step handlers on raw bytes, called without the network (fast)."""
    server, _, _ = live
    generic = serverlib.method_handlers(server.servicer)

    class Details:
        def __init__(self, method):
            self.method = method

    return {name: generic.service(Details(f"/{serverlib.SERVICE}/{name}")).unary_unary for name in ("Join", "Step")}


def outcome(handler, data: bytes):
    """The reply, or the status code of the refusal; anything else raised is a server bug (and fails here)."""
    try:
        return handler(data, FakeContext())
    except Aborted as e:
        code, details = e.args
        assert isinstance(details, str) and details and len(details) < 2000, details
        return code


def mutations():
    """A valid request's bytes with a few bytes overwritten, inserted or cut, or truncated."""
    edit = st.tuples(st.sampled_from(["set", "insert", "delete"]), st.integers(0, 1 << 20),
                     st.binary(min_size=1, max_size=8))
    return st.tuples(st.lists(edit, min_size=1, max_size=4), st.integers(0, 1 << 20) | st.none())


def mutate(data: bytes, plan) -> bytes:
    edits, cut = plan
    out = bytearray(data)
    for kind, where, blob in edits:
        i = where % (len(out) + 1)
        if kind == "set":
            out[i:i + len(blob)] = blob
        elif kind == "insert":
            out[i:i] = blob
        else:
            del out[i:i + len(blob)]
    return bytes(out[: cut % (len(out) + 1)] if cut is not None else out)


def assert_answered_or_refused(handlers, server, name: str, data: bytes) -> None:
    step = server.servicer.step
    got = outcome(handlers[name], data)
    if isinstance(got, grpc.StatusCode):
        assert got in REFUSALS, got
        assert server.servicer.step == step
    else:
        assert server.servicer.step in (step, step + 1)
    assert server.servicer.state_sizes()["client_id_bytes"] <= (HISTORY + 1) * guard.MAX_CLIENT_ID_BYTES


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_LONG = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_raw_bytes_handled(handlers, live, name, data):
    assert_answered_or_refused(handlers, live[0], name, data)


def assert_mutated_request_handled(handlers, live, name, plan):
    server = live[0]
    good = (good_request(server.servicer.step) if name == "Step" else join_request("tester", server.servicer.step))
    assert_answered_or_refused(handlers, server, name, mutate(good.SerializeToString(), plan))


@FUZZ
@given(name=st.sampled_from(["Join", "Step"]), data=st.binary(max_size=512))
def test_fuzz_raw_bytes(handlers, live, name, data):
    assert_raw_bytes_handled(handlers, live, name, data)


@FUZZ
@given(name=st.sampled_from(["Join", "Step"]), plan=mutations())
def test_fuzz_mutated_valid_requests(handlers, live, name, plan):
    assert_mutated_request_handled(handlers, live, name, plan)


@pytest.mark.slow
@FUZZ_LONG
@given(name=st.sampled_from(["Join", "Step"]), data=st.binary(max_size=4096))
def test_fuzz_raw_bytes_long(handlers, live, name, data):
    assert_raw_bytes_handled(handlers, live, name, data)


@pytest.mark.slow
@FUZZ_LONG
@given(name=st.sampled_from(["Join", "Step"]), plan=mutations())
def test_fuzz_mutated_valid_requests_long(handlers, live, name, plan):
    assert_mutated_request_handled(handlers, live, name, plan)


def test_fuzzed_requests_over_the_network_then_a_good_step(live):
    """A sample of the fuzz cases through the live server: the same statuses, and it still serves."""
    server, stub, channel = live
    good = good_request(server.servicer.step).SerializeToString()
    send = raw_method(channel, "Step")
    for i in range(0, len(good), max(1, len(good) // 16)):
        for data in (good[:i], good[:i] + b"\xff\xff\xff" + good[i + 3:]):
            step = server.servicer.step
            try:
                send(data, metadata=MD, timeout=RPC_TIMEOUT)
            except grpc.RpcError as e:
                assert e.code() in REFUSALS, (e.code(), e.details())
                assert server.servicer.step == step
    step = server.servicer.step
    assert stub.Step(good_request(step), metadata=MD, timeout=RPC_TIMEOUT).step == step
