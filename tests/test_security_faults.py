"""Bearer-token checks against hostile metadata: duplicate ``authorization`` entries are refused.

The interceptor is tested directly with made-up call details, and once behind a live gRPC server on
127.0.0.1 (the split service with a minimal servicer behind it: what is under test is what reaches it).
"""

from __future__ import annotations

import collections
import itertools
from concurrent import futures

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtl_jax.split import security as seclib
from qtl_jax.split.proto import split_pb2 as pb
from qtl_jax.split.proto import split_pb2_grpc as pb_grpc

TOKEN = "s3cret-token"
RIGHT = ("authorization", f"Bearer {TOKEN}")
WRONG = ("authorization", "Bearer guess")
OTHER = ("x-client", "tester")
SEVERAL = "more than one 'authorization' metadata entry"
MISSING_OR_WRONG = "missing or wrong bearer token"

CallDetails = collections.namedtuple("CallDetails", ["method", "invocation_metadata"])


class Aborted(Exception):
    pass


class FakeContext:
    def abort(self, code, details):
        raise Aborted(code, details)


def outcome(metadata) -> str:
    """'accepted', or the refusal's status code and message, for a call carrying ``metadata``."""
    interceptor = seclib.TokenAuthInterceptor(TOKEN)
    details = CallDetails("/qtl_jax.split.v1.SplitLearning/Join", tuple(metadata))
    accepted = object()
    handler = interceptor.intercept_service(lambda d: accepted, details)
    if handler is accepted:
        return "accepted"
    with pytest.raises(Aborted) as refused:
        handler.unary_unary(pb.JoinRequest(), FakeContext())
    code, message = refused.value.args
    assert code == grpc.StatusCode.UNAUTHENTICATED
    return message


def test_exactly_one_right_token_is_accepted():
    assert outcome([RIGHT]) == "accepted"
    assert outcome([OTHER, RIGHT]) == "accepted"
    assert outcome([]).startswith(MISSING_OR_WRONG)
    assert outcome([WRONG]).startswith(MISSING_OR_WRONG)
    assert outcome([("authorization", TOKEN)]).startswith(MISSING_OR_WRONG)  # without 'Bearer '


@pytest.mark.parametrize("metadata", [[WRONG, RIGHT], [RIGHT, WRONG], [RIGHT, RIGHT], [RIGHT, OTHER, WRONG]])
def test_several_authorization_entries_are_refused_whatever_their_order(metadata):
    assert outcome(metadata).startswith(SEVERAL)


@settings(max_examples=50, deadline=None)
@given(entries=st.lists(st.sampled_from([RIGHT, WRONG, OTHER, ("authorization", "")]), max_size=6))
def test_a_call_passes_only_with_a_single_right_entry(entries):
    auth = [e for e in entries if e[0] == "authorization"]
    expected = "accepted" if auth == [RIGHT] else (SEVERAL if len(auth) > 1 else MISSING_OR_WRONG)
    assert outcome(entries).startswith(expected)


# ---------------------------------------------------------------------------------------------------
# Live server


class CountingServicer(pb_grpc.SplitLearningServicer):
    """Answers Join and counts the calls that got through authentication."""

    def __init__(self):
        self.joins = 0

    def Join(self, request, context):  # noqa: N802 - the generated service's method name
        self.joins += 1
        return pb.JoinReply(protocol_version=request.protocol_version, server_step=7)


@pytest.fixture(scope="module")
def live():
    servicer = CountingServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         interceptors=[seclib.TokenAuthInterceptor(TOKEN)])
    pb_grpc.add_SplitLearningServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield servicer, pb_grpc.SplitLearningStub(channel)
    channel.close()
    server.stop(grace=None).wait(10)


def test_live_server_refuses_duplicate_authorization_headers(live):
    servicer, stub = live
    before = servicer.joins
    client_metadata = seclib.call_metadata(seclib.SecurityConfig(token=TOKEN))
    assert client_metadata == (RIGHT,)
    assert stub.Join(pb.JoinRequest(protocol_version=1), metadata=client_metadata, timeout=30).server_step == 7
    # The probe: with a dict, "wrong, right" was accepted and "right, wrong" refused.
    for metadata in itertools.permutations([WRONG, RIGHT]):
        with pytest.raises(grpc.RpcError) as refused:
            stub.Join(pb.JoinRequest(protocol_version=1), metadata=metadata, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert refused.value.details().startswith(SEVERAL)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Join(pb.JoinRequest(protocol_version=1), metadata=(RIGHT, RIGHT), timeout=30)
    assert refused.value.details().startswith(SEVERAL)
    assert servicer.joins == before + 1  # only the well-formed call reached the service
