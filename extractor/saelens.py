"""Moved to ``extractor.formats``, which owns both export formats; this module stays only for the
modules that still import ``SAEFormatError`` from here (``extractor.evaluate``, ``extractor.steer``)."""

from .formats import SAEFormatError

__all__ = ["SAEFormatError"]
