"""Firecracker backend pieces: API models, the API client, and the boot request sequence.

The request bodies and paths follow the vendored Firecracker v1.16.1 OpenAPI spec
(`firecracker-v1.16.1.yaml`, Apache-2.0, LICENSE in this folder).
"""

from .api import FirecrackerApi
from .boot import DriveSpec, FcBootSpec, boot_sequence, swap_placeholder

__all__ = ["FirecrackerApi", "DriveSpec", "FcBootSpec", "boot_sequence", "swap_placeholder"]
