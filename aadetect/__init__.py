"""aadetect: find anomalous images with an autoencoder (optionally adversarial) and a latent-space density.

Kept import-light on purpose: ``aadetect --help`` must not pull in torch or scipy.
"""

__version__ = "0.1.0"
