"""vidiffuse: video diffusion from data to production."""

__version__ = "0.1.0"
