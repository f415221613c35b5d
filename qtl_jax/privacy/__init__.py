"""Privacy evaluation: feature-inversion attacks on what crosses the split (docs/privacy.md).

* :mod:`qtl_jax.privacy.inversion` -- a decoder from received image codes back to images.
* :mod:`qtl_jax.privacy.text_attack` -- token recovery from received text codes.
* :mod:`qtl_jax.privacy.metrics` -- PSNR and Gaussian-window SSIM.
* :mod:`qtl_jax.privacy.run` -- the whole evaluation: ``python -m qtl_jax.privacy.run --workdir=DIR``.
"""
