"""repa_fast: fast REPA (representation alignment) training of SiT diffusion transformers."""
from .version import __version__

__all__ = ["__version__"]
