"""dalle-pipeline: an orchestrated, tracked pipeline that trains DALL-E-style text-to-image models."""

__version__ = "0.1.0"
