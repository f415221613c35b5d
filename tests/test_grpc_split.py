"""Split learning over gRPC on 127.0.0.1: equivalence with the in-process split step, security,
validation at a live server, exactly-once steps, byte accounting, restart of either side.

A tiny random model (1-layer ViT and decoder, D=16, L=4). The server runs in a thread of the test
process (a real gRPC server on a free loopback port); the client half runs in the test's thread. The
command-line round trip (two real processes, kill and restart) is in the ``slow`` tests at the end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import grpc
import jax
import numpy as np
import pytest

from qtl_jax import codec
from qtl_jax.models import quantized as qm
from qtl_jax.models.connector import ConnectorConfig
from qtl_jax.models.decoder import DecoderConfig
from qtl_jax.models.tinyllava import TinyLlavaConfig
from qtl_jax.models.vision import VisionConfig
from qtl_jax.quantizer import QuantizerConfig
from qtl_jax.split import downlink as dl
from qtl_jax.split import link as linklib
from qtl_jax.split import security as seclib
from qtl_jax.split import server as serverlib
from qtl_jax.split import step as steplib
from qtl_jax.split import wire
from qtl_jax.split.grpc_link import GrpcServerHalf
from qtl_jax.split.link import StepMismatchError
from qtl_jax.split.mesh import replicated, split_meshes
from qtl_jax.split.proto import split_pb2 as pb
from qtl_jax.split.proto import split_pb2_grpc as pb_grpc
from qtl_jax.train import checkpoint as ckptlib

D, VOCAB, B, T, LEVELS, STEPS = 16, 48, 4, 10, 4, 3
OPTIMIZER = dict(lr=3e-3, weight_decay=0.1, warmup_ratio=0.0, schedule="constant", grad_clip_norm=1.0,
                 no_decay=[".*/bias", ".*norm.*/scale"], param_groups=[(".*", 1.0)])
RPC_TIMEOUT = 120.0


def tiny_config() -> qm.QuantizedTinyLlavaConfig:
    vision = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=16, patch_size=8)
    llm = DecoderConfig.make(family="llama", vocab_size=VOCAB, hidden_size=D, num_layers=1, num_heads=2,
                             num_kv_heads=1, intermediate_size=32, head_dim=8, tie_word_embeddings=True)
    model = TinyLlavaConfig(vision=vision, connector=ConnectorConfig("mlp2x_gelu", 16, D), llm=llm)
    return qm.QuantizedTinyLlavaConfig(model, QuantizerConfig(dim=D, levels=LEVELS),
                                       QuantizerConfig(dim=D, levels=LEVELS, scaling="ema"))


def make_batch(seed: int) -> dict[str, np.ndarray]:
    """4 samples: image placeholder at position 1 except sample 2 (text only); sample 3 padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    has_image = np.ones(B, np.int32)
    ids[:, 1] = -200
    has_image[2] = 0
    ids[2, 1] = 7
    mask[3, 6:] = 0
    ids[mask == 0] = 0
    labels = np.where(np.arange(T) >= 3, ids, -100).astype(np.int32)
    labels[mask == 0] = -100
    pixels = rng.normal(size=(B, 16, 16, 3)).astype(np.float32)
    pixels[2] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels, has_image=has_image)


BATCHES = [make_batch(s) for s in range(STEPS + 1)]
CONFIG = tiny_config()
GEOMETRY = wire.geometry_of(CONFIG, B, T)


MESHES = split_meshes(0, 0, devices=jax.devices()[:2])


def meshes():
    return MESHES


def fresh_state(m=MESHES):
    state = steplib.create_train_state(CONFIG, jax.random.key(0), m, OPTIMIZER, total_steps=10)
    return state, PROGRAMS.optimizers


class Programs:
    """One compilation of each side's programs for the whole module (servers and links come and go)."""

    def __init__(self):
        self._built = None

    def _build(self):
        if self._built is None:
            state = steplib.create_train_state(CONFIG, jax.random.key(0), MESHES, OPTIMIZER, total_steps=10)
            optimizers = steplib.make_split_optimizers(OPTIMIZER, 10, {"client": state.client.params,
                                                                       "server": state.server.params})
            self._built = (optimizers, serverlib.make_server_update(CONFIG, optimizers),
                           steplib.SplitStep(CONFIG, MESHES, optimizers, server=None))
        return self._built

    @property
    def optimizers(self):
        return self._build()[0]

    @property
    def server_update(self):
        return self._build()[1]

    def client_step(self, server_half):
        """The split step with its server half behind ``server_half`` (the client programs compiled once)."""
        step = self._build()[2]
        step.server = server_half
        return step


PROGRAMS = Programs()


def halves(state):
    empty = steplib.PartitionState({}, {}, {})
    return state.replace(server=empty), state.replace(client=empty)


class Server:
    """A live gRPC server on 127.0.0.1 (free port) in this process, with its servicer."""

    def __init__(self, security=None, options=None, checkpointer=None, state=None):
        m = meshes()
        full, optimizers = fresh_state(m)
        _, server_state = halves(full if state is None else state)
        self.servicer = serverlib.SplitServicer(CONFIG, server_state, optimizers, m.server, GEOMETRY,
                                                options or serverlib.ServerOptions(), checkpointer,
                                                update=PROGRAMS.server_update)
        self.security = security or seclib.SecurityConfig()
        self.grpc_server, self.port = serverlib.serve(self.servicer, "127.0.0.1:0", self.security)
        self.target = f"127.0.0.1:{self.port}"

    def stop(self):
        self.grpc_server.stop(grace=None).wait(10)


@pytest.fixture(scope="module")
def in_process_step():
    """The in-process split step (InProcessServerHalf), compiled once for the module."""
    return steplib.make_train_step(CONFIG, MESHES, PROGRAMS.optimizers, mode="split")


@pytest.fixture(scope="module")
def reference(in_process_step):
    """The in-process split step: per-step metrics and the final state."""
    state, _ = fresh_state()
    step = in_process_step
    history = []
    for i in range(STEPS):
        state, metrics = step(state, BATCHES[i])
        history.append(metrics)
    return history, jax.device_get(state)


@pytest.fixture(scope="module")
def plain_server():
    server = Server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def networked(plain_server):
    """The same steps through the network: client here, server partition behind gRPC."""
    m = meshes()
    state, optimizers = fresh_state(m)
    client_state, _ = halves(state)
    link = GrpcServerHalf(plain_server.target, GEOMETRY, client_id="equivalence", timeout_s=RPC_TIMEOUT)
    assert link.join(0) == 0
    step = PROGRAMS.client_step(link)
    history = []
    for i in range(STEPS):
        client_state, metrics = step(client_state, BATCHES[i])
        history.append(metrics)
    link.close()
    return history, jax.device_get(client_state), jax.device_get(plain_server.servicer.state)


def assert_trees_equal(a, b):
    """Bit-for-bit: both sides run the same jitted programs on the same devices, so nothing may differ."""
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb) and la
    for (path, x), y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------------
# Equivalence and bytes


def test_network_training_equals_in_process_split(reference, networked):
    ref_history, ref_state = reference
    net_history, client_state, server_state = networked
    for ref, net in zip(ref_history, net_history):
        for k in ("loss", "ce", "dist_image", "dist_text", "tokens", "target_tokens"):
            assert net[k] == ref[k], k
    # Training moved the parameters, and both sides moved them as the in-process step did.
    assert int(client_state.step) == int(server_state.step) == STEPS
    assert_trees_equal(client_state.client.params, ref_state.client.params)
    assert_trees_equal(client_state.client.batch_stats, ref_state.client.batch_stats)
    assert_trees_equal(client_state.client.opt_state, ref_state.client.opt_state)
    assert_trees_equal(server_state.server.params, ref_state.server.params)
    assert_trees_equal(server_state.server.opt_state, ref_state.server.opt_state)
    initial, _ = fresh_state(meshes())
    moved = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                   jax.device_get(initial.server.params), server_state.server.params)
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-4


def test_wire_bytes_are_measured_and_close_to_theory(reference, networked):
    ref_history, _ = reference
    net_history, _, _ = networked
    for ref, net in zip(ref_history, net_history):
        # The theoretical figures equal the in-process link's (same codes, same positions).
        for k in ("uplink_bytes_ans", "uplink_bytes_packed", "uplink_bytes_fp16", "uplink_bytes_side", "downlink_bytes"):
            assert net[k] == ref[k], k
        # The protobuf framing adds only field tags, lengths and the small header fields.
        assert 0 < net["wire_uplink_bytes"] - net["uplink_bytes_ans"] < 100
        assert 0 < net["wire_downlink_bytes"] - net["downlink_bytes"] < 200
        assert net["wire_replayed"] == 0
    summary = linklib.wire_summary(net_history, B)
    assert summary["steps"] == STEPS and summary["samples"] == STEPS * B
    assert summary["total"]["wire_uplink_bytes"] == sum(h["wire_uplink_bytes"] for h in net_history)
    assert summary["wire_uplink_vs_fp16"] < 0.5  # L=4 codes are far smaller than fp16 features


def test_wire_carries_the_round_trip_accounting(networked):
    net_history, _, _ = networked
    for net in net_history:
        assert net["downlink_bytes"] == net["downlink_bytes_fp32"] and net["batch_samples"] == B
        assert net["roundtrip_bytes_per_sample"] == (net["uplink_bytes"] + net["downlink_bytes"]) / B
        assert net["roundtrip_bytes_per_sample_paper"] == (net["uplink_bytes_fp16"] + net["downlink_bytes_fp32"]) / B


# ---------------------------------------------------------------------------------------------------
# Downlink compression: the same message in process and over the network

QUANTIZED = dl.DownlinkSpec("quantized", bits=3, scale="token", error_feedback=True, topk=0.5, seed=7)


def with_residual(state, spec):
    """``state`` with the server partition's error-feedback residual (one client), as train/setup.py builds it."""
    residual = dl.initial_residual(spec, B, CONFIG.model.num_image_tokens, T, D)
    return state.replace(server=state.server.replace(batch_stats=jax.device_put(residual, replicated(MESHES.server))))


def test_quantized_downlink_with_error_feedback_is_the_same_in_process_and_over_grpc():
    """Stochastic rounding keyed by (seed, client, step), error feedback and top-k: the network run's losses,
    parameters, residual and downlink bytes equal the in-process server half's (same programs, same devices)."""
    optimizers = PROGRAMS.optimizers
    half = linklib.InProcessServerHalf(MESHES, steplib.server_update_fn(CONFIG, optimizers), downlink=QUANTIZED)
    step = PROGRAMS.client_step(half)
    state = with_residual(fresh_state()[0], QUANTIZED)
    ref = []
    for i in range(STEPS):
        state, metrics = step(state, BATCHES[i])
        ref.append(metrics)
    ref_state = jax.device_get(state)

    server = Server(options=serverlib.ServerOptions(downlink=QUANTIZED), state=with_residual(fresh_state()[0], QUANTIZED))
    try:
        link = GrpcServerHalf(server.target, GEOMETRY, client_id="q", timeout_s=RPC_TIMEOUT, downlink=QUANTIZED)
        assert link.join(0) == 0
        client_state = halves(fresh_state()[0])[0]
        step = PROGRAMS.client_step(link)
        net = []
        for i in range(STEPS):
            client_state, metrics = step(client_state, BATCHES[i])
            net.append(metrics)
        link.close()
        # A client configured for another downlink is refused at the handshake, naming both settings.
        other = GrpcServerHalf(server.target, GEOMETRY, client_id="q", timeout_s=RPC_TIMEOUT,
                               downlink=dl.DownlinkSpec("fp32"))
        with pytest.raises(ValueError, match="sends the downlink as quantized 3 bits .* asks for fp32"):
            other.join(STEPS)
        other.close()
    finally:
        server.stop()
    for r, n in zip(ref, net):
        for k in ("loss", "ce", "dist_image", "dist_text"):
            assert n[k] == r[k], k
        # At D=16 a float32 step per token is 2 bits per value and the codec headers weigh: only the order.
        assert n["downlink_bytes"] == r["downlink_bytes"] < r["downlink_bytes_fp32"] / 4
        assert n["wire_downlink_bytes"] - n["downlink_bytes"] < 200
    assert_trees_equal(jax.device_get(client_state.client.params), ref_state.client.params)
    served = jax.device_get(server.servicer.state.server)
    assert_trees_equal(served.params, ref_state.server.params)
    assert_trees_equal(served.batch_stats, ref_state.server.batch_stats)
    assert np.any(served.batch_stats[dl.RESIDUAL_KEY]["0"]["text"] != 0)


# ---------------------------------------------------------------------------------------------------
# Exactly-once steps


def good_request(step: int, client_id: str = "tester") -> pb.UplinkRequest:
    """A valid uplink for ``step`` built from real codes of the tiny model (one forward, cached)."""
    up = _real_uplink()
    return wire.uplink_to_proto(up, step=step, client_id=client_id, geometry=GEOMETRY)


_UPLINK = {}


def _real_uplink():
    if "up" not in _UPLINK:
        m = meshes()
        state, _ = fresh_state(m)
        out = jax.jit(lambda p, s, b: qm.client_forward(CONFIG, p, s, b).uplink)(
            state.client.params, state.client.batch_stats, BATCHES[STEPS])
        _UPLINK["up"] = jax.device_get(out)
    return _UPLINK["up"]


@pytest.fixture(scope="module")
def live():
    """A server for the adversarial tests, with a small message limit and a token."""
    sec = seclib.SecurityConfig(token="s3cret-token")
    server = Server(security=sec, options=serverlib.ServerOptions(max_message_bytes=64 << 10))
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.SplitLearningStub(channel)
    yield server, stub, seclib.call_metadata(sec)
    channel.close()
    server.stop()


def call_step(stub, request, metadata):
    return stub.Step(request, timeout=RPC_TIMEOUT, metadata=metadata)


def expect_error(code, fn, *args, match: str = ""):
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    assert info.value.code() == code, info.value.details()
    assert match in (info.value.details() or ""), info.value.details()
    return info.value.details()


def test_retry_of_last_step_returns_cached_reply_without_applying_twice(live):
    server, stub, md = live
    start = server.servicer.step
    first = call_step(stub, good_request(start), md)
    params_after = jax.device_get(server.servicer.state.server.params)
    again = call_step(stub, good_request(start), md)
    assert again.replayed and not first.replayed
    assert again.image_grad == first.image_grad and again.text_grad == first.text_grad
    assert server.servicer.step == start + 1 and server.servicer.applied_steps.count(start) == 1
    assert_trees_equal(jax.device_get(server.servicer.state.server.params), params_after)
    # The same step id with different content (a changed batch) is not a retry.
    other = good_request(start)
    other.labels = np.full((B, T), -100, "<i4").tobytes()
    expect_error(grpc.StatusCode.FAILED_PRECONDITION, call_step, stub, other, md, match="different request")
    # Another client of this single-client server is refused whatever it sends.
    expect_error(grpc.StatusCode.PERMISSION_DENIED, call_step, stub, good_request(start, client_id="someone-else"),
                 md, match="this server serves client 'tester'")
    # A step from the past (not the last one) or from the future is refused, naming the expected step.
    expect_error(grpc.StatusCode.FAILED_PRECONDITION, call_step, stub, good_request(start + 5), md,
                 match=f"applies step {start + 1} next")


def test_client_that_loses_the_reply_retries_and_continues(live):
    """The reply to a step is held until the client's deadline has passed and its retry of the same step id
    has arrived (so the first reply is lost); the retry gets the cached reply; the server applied the step once."""
    server, _, _ = live
    start = server.servicer.step
    original = server.servicer.apply
    calls, retried = [], threading.Event()

    def apply_then_stall(request):
        calls.append(request.step)
        if len(calls) > 1:
            retried.set()
            return original(request)
        reply = original(request)
        assert retried.wait(RPC_TIMEOUT)
        return reply

    server.servicer.apply = apply_then_stall
    link = GrpcServerHalf(server.target, GEOMETRY, server.security, client_id="tester", timeout_s=2.0, retries=3,
                          retry_pause_s=0.1)
    try:
        down, counts = link.exchange(start, _real_uplink())
    finally:
        server.servicer.apply = original
        link.close()
    assert calls[0] == start and set(calls) == {start} and len(calls) >= 2 and counts["wire_replayed"] == 1
    assert server.servicer.applied_steps.count(start) == 1 and server.servicer.step == start + 1
    assert np.any(down.text_grad != 0)


# ---------------------------------------------------------------------------------------------------
# Validation at a live server


def test_malformed_messages_get_clear_errors_and_the_server_keeps_serving(live):
    server, stub, md = live
    step = server.servicer.step
    good = good_request(step)
    up = _real_uplink()
    labels = np.asarray(up.labels).copy()
    labels[0, 4] = VOCAB + 3
    bad_valid = np.asarray(up.image_valid).copy()
    bad_valid[:] = bad_valid[::-1]
    two_placeholders = np.asarray(up.image_mask).copy()
    two_placeholders[0, 5] = 1
    cases = [
        (dict(protocol_version=99), grpc.StatusCode.FAILED_PRECONDITION, "protocol_version=99"),
        # A version-2 client (before the downlink coding) is told to upgrade, not misread.
        (dict(protocol_version=2), grpc.StatusCode.FAILED_PRECONDITION,
         "protocol_version=2, but this side speaks version 3"),
        (dict(**{"geometry.image_levels": 8}), grpc.StatusCode.INVALID_ARGUMENT, "image_levels: got 8, expected 4"),
        (dict(**{"geometry.batch_size": B + 1}), grpc.StatusCode.INVALID_ARGUMENT, "batch_size"),
        (dict(image_codes=good.image_codes[:-7]), grpc.StatusCode.INVALID_ARGUMENT, "image_codes"),
        (dict(text_codes=b"garbage"), grpc.StatusCode.INVALID_ARGUMENT, "text_codes"),
        (dict(attention_mask=good.attention_mask[:-1]), grpc.StatusCode.INVALID_ARGUMENT, "attention_mask is"),
        (dict(attention_mask=bytes([2]) + good.attention_mask[1:]), grpc.StatusCode.INVALID_ARGUMENT, "only 0/1"),
        (dict(labels=labels.astype("<i4").tobytes()), grpc.StatusCode.INVALID_ARGUMENT, "labels hold"),
        (dict(image_valid=bad_valid.tobytes()), grpc.StatusCode.INVALID_ARGUMENT, "disagrees with their image_mask"),
        (dict(image_mask=two_placeholders.tobytes()), grpc.StatusCode.INVALID_ARGUMENT, "at most 1"),
        # Codes of the wrong alphabet: a valid codec message with levels=8 and indices up to 7.
        (dict(text_codes=codec.encode(
            np.full((int(up.text_positions().sum()), D), 7, np.uint8), 8)), grpc.StatusCode.INVALID_ARGUMENT,
         "levels=8"),
        (dict(step=-1), grpc.StatusCode.INVALID_ARGUMENT, "step=-1"),
    ]
    for changes, code, match in cases:
        req = pb.UplinkRequest()
        req.CopyFrom(good)
        for k, v in changes.items():
            if k.startswith("geometry."):
                setattr(req.geometry, k.split(".", 1)[1], v)
            else:
                setattr(req, k, v)
        expect_error(code, call_step, stub, req, md, match=match)
    # Oversized: more than the server's 64 KiB limit.
    req = pb.UplinkRequest()
    req.CopyFrom(good)
    req.image_codes = b"\0" * (80 << 10)
    expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, call_step, stub, req, md)
    # Truncated bytes that are not a protobuf message at all.
    channel = grpc.insecure_channel(server.target)
    garbled = channel.unary_unary("/qtl_jax.split.v1.SplitLearning/Step",
                                  request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        garbled(good.SerializeToString()[:-9], timeout=RPC_TIMEOUT, metadata=md)
    # The server parses requests itself (split/guard.py), so garbage is a refusal, never gRPC's INTERNAL.
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    channel.close()
    # Nothing was applied; the server still serves a good step.
    assert server.servicer.step == step
    reply = call_step(stub, good, md)
    assert reply.step == step and not reply.replayed and server.servicer.step == step + 1


def test_missing_or_wrong_token_is_refused(live):
    server, stub, md = live
    step = server.servicer.step
    expect_error(grpc.StatusCode.UNAUTHENTICATED, call_step, stub, good_request(step), (), match="bearer token")
    expect_error(grpc.StatusCode.UNAUTHENTICATED, call_step, stub, good_request(step),
                 (("authorization", "Bearer wrong"),))
    assert server.servicer.step == step


# ---------------------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return seclib.make_test_pki(str(tmp_path_factory.mktemp("pki")))


def test_mutual_tls_accepts_the_good_client_and_refuses_others(pki):
    sec = seclib.SecurityConfig(tls="mutual", ca_cert=pki["ca_cert"], server_cert=pki["server_cert"],
                                server_key=pki["server_key"])
    server = Server(security=sec)
    try:
        def join(client_sec):
            link = GrpcServerHalf(server.target, GEOMETRY, client_sec, timeout_s=10.0, retries=0)
            try:
                return link.join(0)
            finally:
                link.close()

        good = seclib.SecurityConfig(tls="mutual", ca_cert=pki["ca_cert"], client_cert=pki["client_cert"],
                                     client_key=pki["client_key"])
        assert join(good) == 0
        rogue = seclib.SecurityConfig(tls="mutual", ca_cert=pki["ca_cert"], client_cert=pki["rogue_cert"],
                                      client_key=pki["rogue_key"])
        no_cert = seclib.SecurityConfig(tls="server", ca_cert=pki["ca_cert"])
        plaintext = seclib.SecurityConfig()
        for bad in (rogue, no_cert, plaintext):
            with pytest.raises(grpc.RpcError) as info:
                join(bad)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, bad
        # A client that does not trust the server's CA refuses the server.
        wrong_ca = seclib.SecurityConfig(tls="mutual", ca_cert=pki["rogue_cert"], client_cert=pki["client_cert"],
                                         client_key=pki["client_key"])
        with pytest.raises(grpc.RpcError) as info:
            join(wrong_ca)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_server_tls_with_token(pki):
    sec = seclib.SecurityConfig(tls="server", server_cert=pki["server_cert"], server_key=pki["server_key"],
                                token="tls-token")
    server = Server(security=sec)
    try:
        def join(client_sec):
            link = GrpcServerHalf(server.target, GEOMETRY, client_sec, timeout_s=10.0, retries=0)
            try:
                return link.join(0)
            finally:
                link.close()

        assert join(seclib.SecurityConfig(tls="server", ca_cert=pki["ca_cert"], token="tls-token")) == 0
        with pytest.raises(grpc.RpcError) as info:
            join(seclib.SecurityConfig(tls="server", ca_cert=pki["ca_cert"], token="guess"))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop()


def test_security_config_errors(tmp_path):
    with pytest.raises(ValueError, match="tls='tcp'"):
        seclib.SecurityConfig(tls="tcp")
    with pytest.raises(ValueError, match="server_key is not set"):
        seclib.server_credentials(seclib.SecurityConfig(tls="server"))
    with pytest.raises(FileNotFoundError, match="ca_cert="):
        seclib.open_channel("127.0.0.1:1", seclib.SecurityConfig(tls="server", ca_cert=str(tmp_path / "x.pem")), [])


# ---------------------------------------------------------------------------------------------------
# Several clients (sequential split learning)


def test_two_clients_take_turns_and_match_in_process_sequential_training(in_process_step):
    """Clients 'a' and 'b' (each its own client partition and data) against one server partition,
    turns a0, b0, a1, b1; compared with the in-process split step run in the same order."""
    m = meshes()
    order = [("a", 0), ("b", 1), ("a", 2), ("b", 3)]
    # In process: one server partition, the client partition swapped per turn.
    init, _ = fresh_state(m)
    ref_step = in_process_step
    server_part = init.server
    clients = {"a": init.client, "b": fresh_state(m)[0].client}
    ref_losses = []
    for who, b in order:
        state, metrics = ref_step(init.replace(client=clients[who], server=server_part), BATCHES[b])
        clients[who], server_part = state.client, state.server
        ref_losses.append(metrics["loss"])
    ref = jax.device_get((clients, server_part))

    server = Server(options=serverlib.ServerOptions(clients=("a", "b"), turn_timeout_s=20.0))
    try:
        links = {c: GrpcServerHalf(server.target, GEOMETRY, client_id=c, timeout_s=RPC_TIMEOUT) for c in "ab"}
        states = {c: halves(fresh_state(m)[0])[0] for c in "ab"}
        losses_ = []
        for who, b in order:
            states[who], metrics = PROGRAMS.client_step(links[who])(states[who], BATCHES[b])
            losses_.append(metrics["loss"])
        assert losses_ == ref_losses
        for c in "ab":
            assert_trees_equal(jax.device_get(states[c].client.params), ref[0][c].params)
        assert_trees_equal(jax.device_get(server.servicer.state.server.params), ref[1].params)
        assert list(server.servicer.applied_by) == ["a", "b", "a", "b"]
        assert list(server.servicer.applied_steps) == [0, 0, 1, 1]
        # Joining tells each client its own next step.
        assert links["b"].join(2) == 2
        # b's step 2 before a's waits for its turn, then goes through.
        stub = pb_grpc.SplitLearningStub(links["b"].channel)
        result, arrived = {}, threading.Event()
        original = server.servicer.apply

        def announce(request):
            arrived.set()
            return original(request)

        server.servicer.apply = announce
        waiter = threading.Thread(
            target=lambda: result.setdefault("reply", stub.Step(good_request(2, "b"), timeout=RPC_TIMEOUT)))
        waiter.start()
        # b's request is at the server; it cannot be applied before a's step 2, which is not sent yet.
        assert arrived.wait(RPC_TIMEOUT)
        assert "reply" not in result and server.servicer.step == 4
        stub.Step(good_request(2, "a"), timeout=RPC_TIMEOUT)
        waiter.join(RPC_TIMEOUT)
        server.servicer.apply = original
        assert result["reply"].step == 2 and list(server.servicer.applied_by)[-2:] == ["a", "b"]
        # An id outside the turn order is refused.
        expect_error(grpc.StatusCode.PERMISSION_DENIED, stub.Step, good_request(3, "c"), match="not one of")
        for link in links.values():
            link.close()
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------------
# Restart: the server rewinds to its checkpoint when a restarted client is behind it


def test_join_rewinds_server_to_its_checkpoint_and_training_continues(tmp_path):
    checkpointer = ckptlib.Checkpointer(str(tmp_path / "server"), keep=3)
    server = Server(options=serverlib.ServerOptions(checkpoint_every=1), checkpointer=checkpointer)
    try:
        link = GrpcServerHalf(server.target, GEOMETRY, timeout_s=RPC_TIMEOUT)
        m = meshes()
        state, optimizers = fresh_state(m)
        client_state, _ = halves(state)
        step = PROGRAMS.client_step(link)
        client_state, first = step(client_state, BATCHES[0])
        after_one = jax.device_get(client_state)
        client_state, second = step(client_state, BATCHES[1])
        checkpointer.wait()
        assert server.servicer.step == 2
        # The client "crashes" and restarts from its state after step 1: the server goes back too.
        assert link.join(1) == 1 and list(server.servicer.rewinds) == [(2, 1)]
        with pytest.raises(StepMismatchError):
            step(jax.device_get(after_one).replace(step=np.int32(5)), BATCHES[1])
        resumed, again = step(jax.tree_util.tree_map(lambda x: x, after_one), BATCHES[1])
        assert again["loss"] == second["loss"]
        assert_trees_equal(jax.device_get(resumed.client.params), jax.device_get(client_state.client.params))
        # A client behind every checkpoint the server has is told which steps exist.
        with pytest.raises(grpc.RpcError) as info:
            link.join(0)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no checkpoint of step 0" in info.value.details()
        link.close()
    finally:
        server.stop()
        checkpointer.close()


# ---------------------------------------------------------------------------------------------------
# Two real processes (slow): the command lines, equality with train.py, kill and restart each side

TINY = ["--config=configs/stage1.py:tiny", "--config.eval.enabled=False", "--config.checkpoint_every=2"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESS_TIMEOUT = 400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, workdir, port: int, *extra: str, log=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", module, *TINY, f"--workdir={workdir}", f"--address=127.0.0.1:{port}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(workdir) -> dict[int, dict]:
    from qtl_jax.train.metrics_log import read_jsonl

    return {r["step"]: r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


def wait_for(predicate, what: str, timeout: float = PROCESS_TIMEOUT):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def in_process_run(tmp_path_factory):
    """train.py on the tiny config (split mode, in-process link): the reference per-step metrics."""
    workdir = tmp_path_factory.mktemp("train_py")
    out = subprocess.run([sys.executable, "train.py", *TINY, f"--workdir={workdir}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=PROCESS_TIMEOUT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return losses(workdir)


@pytest.mark.slow
def test_command_lines_train_like_train_py(in_process_run, tmp_path):
    port = free_port()
    # The server's output goes to a file: a pipe nobody reads would block it once full.
    with open(tmp_path / "server.log", "w") as slog:
        server = launch("qtl_jax.split.server", tmp_path / "server", port, log=slog)
        try:
            client = subprocess.run(
                [sys.executable, "-m", "qtl_jax.split.client", *TINY, f"--workdir={tmp_path / 'client'}",
                 f"--address=127.0.0.1:{port}"], cwd=ROOT, capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
            assert client.returncode == 0, client.stdout[-3000:] + client.stderr[-3000:]
            # The server saves its last checkpoint and shuts down after the client is done; slow under load.
            assert server.wait(timeout=180) == 0, (tmp_path / "server.log").read_text()[-3000:]
        finally:
            server.kill()
            server.wait(10)
    assert "uplink, on the wire (protobuf)" in client.stdout
    net = losses(tmp_path / "client")
    assert sorted(net) == sorted(in_process_run) == list(range(1, 7))
    for step, ref in in_process_run.items():
        assert net[step]["loss"] == ref["loss"], step
        for k in ("uplink_bytes_ans", "uplink_bytes_packed", "uplink_bytes_fp16", "downlink_bytes"):
            assert net[step][k] == ref[k], (step, k)
        assert net[step]["wire_uplink_bytes"] > net[step]["uplink_bytes_ans"]
    with open(tmp_path / "client" / "wire_summary.json", encoding="utf-8") as f:
        summary = __import__("json").load(f)
    assert summary["steps"] == 6 and summary["samples"] == 48
    # Both sides' workdirs say which model they hold, so a next stage can start from either one.
    from qtl_jax.train import checkpoint as ckptlib

    assert ckptlib.read_config(tmp_path / "server")["model"] == ckptlib.read_config(tmp_path / "client")["model"]


@pytest.mark.slow
def test_kill_and_restart_each_side_and_the_run_continues(in_process_run, tmp_path):
    """SIGKILL the client after step 3 (its checkpoint: step 2) and restart it: the server rewinds to its
    own checkpoint of step 2. Then SIGKILL the server after step 3 again and restart it: it resumes from
    its latest checkpoint, the client's retries reach it and the two realign through Join. The run ends
    with the uninterrupted run's per-step losses."""
    port = free_port()
    client_args = ["--config.debug.step_delay=1.0", "--retries=200", "--rpc_timeout_s=120"]
    cdir, sdir = tmp_path / "client", tmp_path / "server"

    def read(path):
        with open(path) as f:
            return f.read()

    with open(tmp_path / "server.log", "w") as slog, open(tmp_path / "client.log", "w") as clog:
        procs = [launch("qtl_jax.split.server", sdir, port, log=slog),
                 launch("qtl_jax.split.client", cdir, port, *client_args, log=clog)]
        try:
            wait_for(lambda: 3 in losses(cdir), "client step 3")
            procs[1].kill()
            procs[1].wait(10)
            procs.append(launch("qtl_jax.split.client", cdir, port, *client_args, log=clog))
            wait_for(lambda: "resumed" in read(tmp_path / "client.log"), "the client's resume")
            wait_for(lambda: 3 in losses(cdir), "client step 3 after the client restart")
            procs[0].kill()
            procs[0].wait(10)
            procs.append(launch("qtl_jax.split.server", sdir, port, log=slog))
            assert procs[2].wait(timeout=PROCESS_TIMEOUT) == 0, read(tmp_path / "client.log")[-3000:]
            assert procs[3].wait(timeout=60) == 0, read(tmp_path / "server.log")[-3000:]
        finally:
            for p in procs:
                p.kill()
                p.wait(10)
    client_log, server_log = read(tmp_path / "client.log"), read(tmp_path / "server.log")
    assert "qtl_jax: resumed" in client_log and "at step 2" in client_log
    assert "qtl_jax.split.server: resumed" in server_log and "done at step 6" in server_log
    net = losses(cdir)
    assert sorted(net) == list(range(1, 7))
    for step, ref in in_process_run.items():
        assert net[step]["loss"] == ref["loss"], step
