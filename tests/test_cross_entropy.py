"""quantized.cross_entropy (hand-written VJP) against torch's next-token cross-entropy, value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from qtl_jax.models.quantized import cross_entropy
from tolerances import rounding_tolerance


def torch_reference(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    t = torch.tensor(logits, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(
        t[:, :-1].reshape(-1, logits.shape[-1]), torch.tensor(labels[:, 1:]).reshape(-1).long(), ignore_index=-100
    )
    loss.backward()
    return float(loss.detach()), t.grad.numpy()


def test_value_and_gradient_match_torch():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(3, 11, 29)) * 4).astype(np.float32)
    labels = rng.integers(0, 29, (3, 11))
    labels[0, :5] = -100
    labels[1, -3:] = -100
    (loss, count), grad = jax.value_and_grad(lambda x: cross_entropy(x, jnp.asarray(labels)), has_aux=True)(
        jnp.asarray(logits)
    )
    ref, ref_grad = torch_reference(logits, labels)
    assert int(count) == int((labels[:, 1:] != -100).sum())
    # Two chained reductions (logsumexp over 29 classes, the mean over <= 33 targets) in another order.
    np.testing.assert_allclose(float(loss), ref, rtol=0, atol=rounding_tolerance(np.float32, 33, 2, abs(ref)))
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=0,
                               atol=rounding_tolerance(np.float32, 33, 2, np.abs(ref_grad).max()))
    assert not np.asarray(grad)[:, -1].any()  # the last position predicts nothing


def test_no_targets_gives_zero_loss_and_zero_gradient():
    logits = jnp.ones((2, 4, 5))
    labels = jnp.full((2, 4), -100)
    (loss, count), grad = jax.value_and_grad(lambda x: cross_entropy(x, labels), has_aux=True)(logits)
    assert float(loss) == 0.0 and int(count) == 0
    assert not np.asarray(grad).any()
