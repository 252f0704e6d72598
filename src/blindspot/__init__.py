"""blindspot: find what medical-image reconstruction and denoising networks cannot see, and help fix it.

Layers (lower never import higher): data -> physics -> models -> attacks -> results -> report.
"""

__version__ = "0.1.0"

from blindspot.errors import BlindspotError

__all__ = ["BlindspotError", "__version__"]
