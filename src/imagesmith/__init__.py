"""imagesmith: featured images for content pipelines, generated with SDXL or found on Pexels."""

__version__ = "0.1.0"
