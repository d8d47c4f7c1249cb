"""Image layer format: writer (a sink), chain reader (a source), squash.

See docs/image-format.md for the byte layout.
"""

from .reader import Chain, Layer, PageRun, list_layers, open_chain
from .writer import (LayerStats, LayerWriter, LocalSink, ParentRef, StreamSink,
                     open_layer_for_write)

__all__ = ["Chain", "Layer", "PageRun", "list_layers", "open_chain", "LayerStats",
           "LayerWriter", "LocalSink", "ParentRef", "StreamSink", "open_layer_for_write"]
