"""imagesmith: featured images for content pipelines, generated with SDXL or found on Pexels."""

import time

__version__ = "0.1.0"

# For "seconds from process start to ready" in the service's health and log (Python's own start-up before
# this import is a few tens of milliseconds).
STARTED_AT = time.monotonic()
