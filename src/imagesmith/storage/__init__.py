"""Image bytes on disk, content-addressed: a file's name is the sha256 of its bytes."""

from imagesmith.storage.files import ImageFiles, StoredImage, parse_image_name

__all__ = ["ImageFiles", "StoredImage", "parse_image_name"]
