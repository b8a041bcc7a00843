"""Latent Diffusion-Constrained Q-learning (LDCQ, arXiv 2309.06599) on PyTorch Lightning."""

__version__ = "0.1.0"
