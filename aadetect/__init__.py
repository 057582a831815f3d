"""aadetect: find anomalous images with an adversarial autoencoder.

Kept import-light on purpose: ``aadetect --help`` must not pull in torch or scipy.
"""

__version__ = "0.1.0"
