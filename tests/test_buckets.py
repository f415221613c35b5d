"""Batches cut to their longest sample rounded up to a bucket: a bounded number of compiled programs.

The split train step of a tiny model runs on batches whose longest samples have many different lengths;
each batch goes through ``sequence.pad_to_bucket`` as ``train.loop`` does. The backend compilations are
counted (``jax.monitoring``'s compile event): the first batch of each bucket compiles the step's
length-dependent programs, every later batch of a bucket seen before compiles nothing, so a run compiles at
most ``len(buckets) + 1`` sets of them.
"""

import jax
import numpy as np
import pytest

from qtl_jax.data import sequence
from qtl_jax.models import quantized as qm
from qtl_jax.models.connector import ConnectorConfig
from qtl_jax.models.decoder import DecoderConfig
from qtl_jax.models.tinyllava import TinyLlavaConfig
from qtl_jax.models.vision import VisionConfig
from qtl_jax.quantizer import QuantizerConfig
from qtl_jax.split import step as steplib
from qtl_jax.split.mesh import split_meshes

D, VOCAB, B, MAX_LENGTH = 16, 32, 3, 24
BUCKETS = (8, 16)
OPTIMIZER = dict(lr=1e-3, weight_decay=0.0, warmup_ratio=0.0, schedule="constant", grad_clip_norm=1.0,
                 no_decay=[".*/bias"], param_groups=[("client/vision_tower/.*", "frozen"), (".*", 1.0)])
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def tiny_config() -> qm.QuantizedTinyLlavaConfig:
    vision = VisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                          image_size=16, patch_size=8)
    llm = DecoderConfig.make(family="llama", vocab_size=VOCAB, hidden_size=D, num_layers=1, num_heads=2,
                             num_kv_heads=1, intermediate_size=24, head_dim=8, tie_word_embeddings=True)
    model = TinyLlavaConfig(vision=vision, connector=ConnectorConfig("mlp2x_gelu", 8, D), llm=llm,
                            max_length=MAX_LENGTH + 3)
    q = QuantizerConfig(dim=D, levels=4)
    return qm.QuantizedTinyLlavaConfig(model, q, q)


def loader_batch(longest: int, seed: int) -> dict[str, np.ndarray]:
    """B samples right-padded to MAX_LENGTH (as the loader yields them); the longest has ``longest`` positions."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.integers(3, longest + 1, B), longest)
    lengths[0] = longest
    mask = (np.arange(MAX_LENGTH)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(1, VOCAB, (B, MAX_LENGTH)), 0).astype(np.int32)
    ids[:, 1] = -200
    labels = np.where((mask > 0) & (np.arange(MAX_LENGTH) >= 2), ids, -100).astype(np.int32)
    return dict(input_ids=ids, attention_mask=mask, labels=labels, has_image=np.ones(B, np.int32),
                pixel_values=rng.normal(size=(B, 16, 16, 3)).astype(np.float32))


@pytest.fixture
def compiles():
    count = {"n": 0}

    def listener(event, duration, **kwargs):
        if event == COMPILE_EVENT:
            count["n"] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield count
    jax.monitoring.unregister_event_duration_listener(listener)


def test_bucketed_lengths_compile_one_set_of_programs_per_bucket(compiles):
    config = tiny_config()
    meshes = split_meshes(1, 1, devices=jax.devices()[:2])
    state = steplib.create_train_state(config, jax.random.key(0), meshes, OPTIMIZER, total_steps=20)
    optimizers = steplib.make_split_optimizers(OPTIMIZER, 20, {"client": state.client.params,
                                                               "server": state.server.params})
    step = steplib.make_train_step(config, meshes, optimizers, mode="split")
    # Longest samples 4..8 fall in bucket 8, 9..16 in 16, 17..24 in the last bucket (MAX_LENGTH).
    plan = [(5, 8), (11, 16), (20, 24), (4, 8), (7, 8), (13, 16), (16, 16), (24, 24), (18, 24), (8, 8)]
    after_each, lengths = [], []
    for i, (longest, bucket) in enumerate(plan):
        batch = sequence.pad_to_bucket(loader_batch(longest, seed=i), BUCKETS)
        lengths.append(batch["input_ids"].shape[1])
        assert lengths[-1] == bucket
        state, metrics = step(state, batch)
        assert np.isfinite(metrics["loss"])
        after_each.append(compiles["n"])
    # The first step also compiles programs that do not depend on the length; each new length then adds the
    # same few programs (the per-length client/server programs), and a length seen before adds none.
    first, per_length = after_each[0], after_each[1] - after_each[0]
    assert first > 0 and 0 < per_length < first
    assert after_each[:3] == [first, first + per_length, first + 2 * per_length]
    assert after_each[3:] == [first + 2 * per_length] * 7
    assert sorted(set(lengths)) == [8, 16, 24]
