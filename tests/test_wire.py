"""The wire format of the network split: generated code is current, messages round-trip, bad input is a
:class:`WireError` (never another exception), sizes are what the codec says. Host numpy only, no models."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtl_jax import codec
from qtl_jax.split import downlink as dl
from qtl_jax.split import wire
from qtl_jax.models.messages import Downlink, Uplink
from qtl_jax.split.link import uplink_counts
from qtl_jax.split.proto import split_pb2 as pb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_DIR = os.path.join("qtl_jax", "split", "proto")


def make_uplink(rng: np.random.Generator, b=4, t=9, t_img=3, d=5, image_levels=4, text_levels=4,
                n_images=None) -> tuple[Uplink, wire.Geometry]:
    """Random but consistent: one placeholder per image sample (row i = sample i), right padding."""
    n_images = int(rng.integers(0, b + 1)) if n_images is None else n_images
    attention = np.zeros((b, t), np.uint8)
    lengths = rng.integers(2, t + 1, b)
    for i, n in enumerate(lengths):
        attention[i, :n] = 1
    image_mask = np.zeros((b, t), np.uint8)
    with_image = rng.permutation(b)[:n_images]
    for i in with_image:
        image_mask[i, int(rng.integers(0, lengths[i]))] = 1
    image_valid = image_mask.max(axis=1)
    labels = np.where(attention > 0, rng.integers(0, 50, (b, t)), -100).astype(np.int32)

    def codes(shape, levels):
        if levels == 0:
            return rng.normal(size=shape).astype(np.float16)
        return rng.integers(0, levels, shape).astype(np.uint8 if levels <= 256 else np.uint16)

    up = Uplink(codes((b, t_img, d), image_levels), codes((b, t, d), text_levels), attention, image_mask,
                image_valid, labels, image_levels=image_levels, text_levels=text_levels)
    geometry = wire.Geometry(b, t, t_img, d, image_levels, text_levels, vocab_size=50)
    return up, geometry


def real_parts(up: Uplink):
    return np.asarray(up.image_codes)[np.asarray(up.image_valid) > 0], np.asarray(up.text_codes)[up.text_positions()]


def test_generated_code_matches_the_proto(tmp_path):
    """split_pb2*.py are committed; regenerating them from split.proto must give the same files."""
    out = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}={PROTO_DIR}", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", os.path.join(PROTO_DIR, "split.proto")],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("split_pb2.py", "split_pb2_grpc.py"):
        with open(os.path.join(ROOT, PROTO_DIR, name), encoding="utf-8") as f:
            committed = f.read()
        with open(tmp_path / PROTO_DIR / name, encoding="utf-8") as f:
            assert f.read() == committed, f"{name} is stale: regenerate it (docs/network_split.md)"


@pytest.mark.parametrize("method", ["ans", "packed"])
@pytest.mark.parametrize("levels", [(4, 4), (256, 3), (0, 16), (4, 0)])
def test_uplink_round_trip(method, levels):
    up, geometry = make_uplink(np.random.default_rng(1), image_levels=levels[0], text_levels=levels[1], n_images=3)
    req = wire.uplink_to_proto(up, step=7, client_id="c", geometry=geometry, codec_method=method)
    got = wire.uplink_from_proto(pb.UplinkRequest.FromString(req.SerializeToString()), geometry)
    for name in ("attention_mask", "image_mask", "image_valid", "labels"):
        np.testing.assert_array_equal(getattr(got, name), getattr(up, name))
    for sent, received in zip(real_parts(up), real_parts(got)):
        np.testing.assert_array_equal(received, sent)
    # Positions that did not travel come back as zeros.
    assert not np.any(np.asarray(got.text_codes)[~up.text_positions()])
    assert not np.any(np.asarray(got.image_codes)[np.asarray(up.image_valid) == 0])
    assert (got.image_levels, got.text_levels) == levels
    # The payload is the codec's: the wire adds only protobuf framing to the theoretical size.
    theory = uplink_counts(up, method)["uplink_bytes"]
    assert 0 < req.ByteSize() - theory < 60


@given(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 6), t=st.integers(2, 12), levels=st.sampled_from([2, 3, 4, 8, 16]),
       method=st.sampled_from(["ans", "packed"]))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_uplink_round_trip_property(seed, b, t, levels, method):
    up, geometry = make_uplink(np.random.default_rng(seed), b=b, t=t, image_levels=levels, text_levels=levels)
    req = wire.uplink_to_proto(up, step=0, client_id="p", geometry=geometry, codec_method=method)
    got = wire.uplink_from_proto(req, geometry)
    for sent, received in zip(real_parts(up), real_parts(got)):
        np.testing.assert_array_equal(received, sent)


@given(seed=st.integers(0, 2**32 - 1), field=st.sampled_from(["image_codes", "text_codes", "attention_mask",
                                                               "image_mask", "image_valid", "labels"]),
       cut=st.integers(0, 40), flip=st.integers(0, 255))
@settings(max_examples=60, deadline=None)
def test_corrupted_fields_raise_wire_error_only(seed, field, cut, flip):
    """Truncated or bit-flipped fields are either still a valid message or a WireError; nothing else."""
    rng = np.random.default_rng(seed)
    up, geometry = make_uplink(rng, n_images=2)
    req = wire.uplink_to_proto(up, step=0, client_id="f", geometry=geometry)
    data = bytearray(getattr(req, field))
    if data:
        data[int(rng.integers(0, len(data)))] ^= flip
    data = bytes(data[: max(len(data) - cut, 0)])
    setattr(req, field, data)
    try:
        got = wire.uplink_from_proto(req, geometry)
    except wire.WireError:
        return
    # Anything accepted must be a well-formed uplink of the server's static shapes, codes in range.
    assert got.image_codes.shape == up.image_codes.shape and got.text_codes.shape == up.text_codes.shape
    assert got.labels.shape == up.labels.shape and got.attention_mask.shape == up.attention_mask.shape
    assert int(np.max(got.image_codes)) < geometry.image_levels and int(np.max(got.text_codes)) < geometry.text_levels


def test_bad_uplinks_name_the_problem():
    up, geometry = make_uplink(np.random.default_rng(3), n_images=2)
    good = wire.uplink_to_proto(up, step=0, client_id="c", geometry=geometry)

    def variant(**fields):
        req = pb.UplinkRequest()
        req.CopyFrom(good)
        for k, v in fields.items():
            setattr(req, k, v)
        return req

    newer = wire.PROTOCOL_VERSION + 1
    with pytest.raises(wire.VersionError, match=f"protocol_version={newer}"):
        wire.uplink_from_proto(variant(protocol_version=newer), geometry)
    with pytest.raises(wire.WireError, match="geometry is missing"):
        req = variant()
        req.ClearField("geometry")
        wire.uplink_from_proto(req, geometry)
    other = wire.Geometry(**{**geometry.__dict__, "dim": 6})
    with pytest.raises(wire.WireError, match="dim: got 5, expected 6"):
        wire.uplink_from_proto(good, other)
    # Codes for more positions than the masks have: a codec message of the wrong shape.
    image, text = real_parts(up)
    with pytest.raises(wire.WireError, match="text_codes: declared shape .* more than max_elements"):
        wire.uplink_from_proto(variant(text_codes=codec.encode(np.concatenate([text, text[:1]]), 4)), geometry)
    with pytest.raises(wire.WireError, match="text_codes declares shape"):
        wire.uplink_from_proto(variant(text_codes=codec.encode(text[:-1], 4)), geometry)
    # An fp16 message where codes are expected.
    with pytest.raises(wire.WireError, match="'fp16' message"):
        wire.uplink_from_proto(variant(image_codes=codec.encode_fp16(image.astype(np.float16))), geometry)
    # An image for a sample without a placeholder, and the same image count in other rows.
    valid = np.asarray(up.image_valid).copy()
    text_only = int(np.flatnonzero(valid == 0)[0])
    valid[text_only] = 1
    with pytest.raises(wire.WireError, match=rf"image_valid of samples \[{text_only}\] disagrees with their image_mask"):
        wire.uplink_from_proto(variant(image_valid=valid.tobytes()), geometry)
    # The right number of images in the wrong rows (the old "real images first" order, say).
    moved = np.roll(np.asarray(up.image_valid), 1)
    with pytest.raises(wire.WireError, match="image_valid of samples .* disagrees"):
        wire.uplink_from_proto(variant(image_valid=moved.tobytes()), geometry)
    # A placeholder at a padding position (move sample 0's placeholder past its end).
    attention = np.asarray(up.attention_mask).copy()
    attention[0, -1] = 0
    mask = np.asarray(up.image_mask).copy()
    mask[0] = 0
    mask[0, -1] = 1
    with pytest.raises(wire.WireError, match="attention_mask is 0"):
        wire.uplink_from_proto(variant(image_mask=mask.tobytes(), attention_mask=attention.tobytes()), geometry)


def test_encode_rejects_unknown_method():
    up, geometry = make_uplink(np.random.default_rng(0))
    with pytest.raises(ValueError, match="codec_method='zip'"):
        wire.uplink_to_proto(up, step=0, client_id="c", geometry=geometry, codec_method="zip")


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_downlink_round_trip(kind):
    rng = np.random.default_rng(5)
    up, _ = make_uplink(rng, n_images=2)
    down = Downlink(rng.normal(size=np.shape(up.image_codes)).astype(np.float32),
                    rng.normal(size=np.shape(up.text_codes)).astype(np.float32))
    reply = wire.downlink_to_proto(down, up, step=3, spec=dl.DownlinkSpec(kind), metrics={"ce": 1.5})
    got = wire.downlink_from_proto(pb.DownlinkReply.FromString(reply.SerializeToString()), up, step=3)
    valid, text_pos = np.asarray(up.image_valid) > 0, up.text_positions()
    want_image, want_text = down.image_grad[valid], down.text_grad[text_pos]
    if kind == "bf16":
        want_image = want_image.astype(ml_dtypes.bfloat16).astype(np.float32)
        want_text = want_text.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(got.image_grad[valid], want_image)
    np.testing.assert_array_equal(got.text_grad[text_pos], want_text)
    assert not np.any(got.text_grad[~text_pos]) and not np.any(got.image_grad[~valid])
    width = 4 if kind == "fp32" else 2
    assert len(reply.image_grad) + len(reply.text_grad) == width * (want_image.size + want_text.size)
    assert dict(reply.metrics) == {"ce": 1.5}
    assert wire.coding_from_proto(reply.downlink) == dl.DownlinkSpec(kind)
    with pytest.raises(wire.WireError, match="for step 3, the client sent step 4"):
        wire.downlink_from_proto(reply, up, step=4)
    reply.text_grad = reply.text_grad[:-1]
    with pytest.raises(wire.WireError, match="text_grad is"):
        wire.downlink_from_proto(reply, up, step=3)


def quantized_message(rng, up, spec):
    """The server's message for random gradients (zero where nothing travels, as the server's are)."""
    valid, text_pos = np.asarray(up.image_valid) > 0, up.text_positions()
    image = rng.normal(size=np.shape(up.image_codes)).astype(np.float32) * valid[:, None, None]
    text = rng.normal(size=np.shape(up.text_codes)).astype(np.float32) * text_pos[..., None]
    message, _ = dl.compress(spec, Downlink(image, text), up, None, dl.step_key(0, 0, 1))
    return jax.device_get(message)


# Bits 2, 3, 5 and 8 (the extremes, an odd and an even width): each spec compiles its own quantizer, so all of
# 2..8 cost CI a minute of compiles for no new path (tests/test_downlink.py covers every width).
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 3, 5, 8]), scale=st.sampled_from(dl.SCALES),
       method=st.sampled_from(["ans", "packed"]), topk=st.sampled_from([1.0, 0.25]))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_quantized_downlink_round_trip_property(seed, bits, scale, method, topk):
    """Indices and steps cross exactly; the positions that did not travel expand to exactly zero."""
    rng = np.random.default_rng(seed)
    up, _ = make_uplink(rng)
    spec = dl.DownlinkSpec("quantized", bits=bits, scale=scale, topk=topk)
    message = quantized_message(rng, up, spec)
    reply = wire.downlink_to_proto(message, up, step=9, spec=spec, codec_method=method)
    got = wire.downlink_from_proto(pb.DownlinkReply.FromString(reply.SerializeToString()), up, step=9)
    for name in ("image_index", "image_step", "text_index", "text_step"):
        np.testing.assert_array_equal(getattr(got, name), np.asarray(getattr(message, name)), err_msg=name)
    assert wire.coding_from_proto(reply.downlink) == dataclasses.replace(spec, topk=float(np.float32(topk)))
    sent = sum(len(getattr(reply, f)) for f in ("image_grad", "text_grad", "image_step", "text_step"))
    assert sent == dl.quantized_bytes(message, up, method)
    grads = jax.device_get(dl.expand(got))
    valid, text_pos = np.asarray(up.image_valid) > 0, up.text_positions()
    assert not np.any(grads.image_grad[~valid]) and not np.any(grads.text_grad[~text_pos])


@given(seed=st.integers(0, 2**16), field=st.sampled_from(["image_grad", "text_grad", "image_step", "text_step"]),
       cut=st.integers(0, 40), flip=st.integers(0, 10**6))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_corrupted_quantized_downlink_raises_wire_error_only(seed, field, cut, flip):
    rng = np.random.default_rng(seed)
    up, _ = make_uplink(rng, n_images=2)
    spec = dl.DownlinkSpec("quantized", bits=3)
    reply = wire.downlink_to_proto(quantized_message(rng, up, spec), up, step=1, spec=spec)
    data = bytearray(getattr(reply, field))
    if data:
        data[flip % len(data)] ^= 1 << (flip % 8)
    setattr(reply, field, bytes(data[: max(len(data) - cut, 0)]) if cut % 2 else bytes(data))
    try:
        got = wire.downlink_from_proto(reply, up, step=1)
    except wire.WireError:
        return
    assert np.all(np.asarray(got.image_index) < spec.levels) and np.all(np.isfinite(got.text_step))


def test_bad_downlink_replies_name_the_problem():
    rng = np.random.default_rng(2)
    up, _ = make_uplink(rng, n_images=2)
    spec = dl.DownlinkSpec("quantized", bits=2)
    good = wire.downlink_to_proto(quantized_message(rng, up, spec), up, step=1, spec=spec)

    def variant(**changes):
        reply = pb.DownlinkReply()
        reply.CopyFrom(good)
        for k, v in changes.items():
            if k.startswith("downlink."):
                setattr(reply.downlink, k.split(".", 1)[1], v)
            else:
                setattr(reply, k, v)
        return reply

    with pytest.raises(wire.VersionError, match="protocol_version=2, but this side speaks version 3"):
        wire.downlink_from_proto(variant(protocol_version=2), up, step=1)
    with pytest.raises(wire.WireError, match="levels=3, downlink.bits=4 means levels=15"):
        wire.downlink_from_proto(variant(**{"downlink.bits": 4}), up, step=1)
    with pytest.raises(wire.WireError, match="split.downlink_bits=9"):
        wire.downlink_from_proto(variant(**{"downlink.bits": 9}), up, step=1)
    with pytest.raises(wire.WireError, match="disagrees with downlink.kind='quantized'"):
        wire.downlink_from_proto(variant(grad_dtype=pb.FLOAT32), up, step=1)
    negative = np.frombuffer(good.text_step, "<f4").copy()
    negative[0] = -1.0
    with pytest.raises(wire.WireError, match="text_step must hold finite steps >= 0"):
        wire.downlink_from_proto(variant(text_step=negative.tobytes()), up, step=1)
    with pytest.raises(wire.WireError, match="image_step is"):
        wire.downlink_from_proto(variant(image_step=good.image_step + b"\0\0\0\0"), up, step=1)
    missing = variant()
    missing.ClearField("downlink")
    with pytest.raises(wire.WireError, match="downlink .the reply's coding. is missing"):
        wire.downlink_from_proto(missing, up, step=1)


def test_a_batch_cut_to_a_bucket_travels_at_its_own_length():
    """The client sends a batch at its bucketed length (as train.py's in-process run computes it); the
    server accepts the lengths ``accepted_lengths`` gives and refuses any other, naming the ones it takes."""
    assert wire.accepted_lengths((32, 64, 128, 256), 100) == (32, 64, 100)
    assert wire.accepted_lengths((), 100) == (100,)
    up, short = make_uplink(np.random.default_rng(5), t=6, n_images=2)
    server = wire.Geometry(**{**short.__dict__, "seq_len": 9})
    # The client's geometry is the server's (max_length 9); the request declares the batch's own 6.
    req = wire.uplink_to_proto(up, step=0, client_id="c", geometry=server)
    assert req.geometry.seq_len == 6
    got = wire.uplink_from_proto(req, server, wire.accepted_lengths((6,), 9))
    assert got.attention_mask.shape == (4, 6) and got.text_codes.shape == (4, 6, 5)
    for sent, received in zip(real_parts(up), real_parts(got)):
        np.testing.assert_array_equal(received, sent)
    with pytest.raises(wire.WireError, match=r"seq_len: got 6, expected one of \[4, 9\]"):
        wire.uplink_from_proto(req, server, (4,))
    with pytest.raises(wire.WireError, match=r"seq_len: got 6, expected one of \[9\]"):
        wire.uplink_from_proto(req, server)
