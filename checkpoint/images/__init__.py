"""Image layer format: writer (a sink), chain reader (a source), squash.

See docs/image-format.md for the byte layout.
"""

from .reader import Chain, Layer, PageRun, list_layers, open_chain
from .signing import key_id, load_sign_key
from .writer import (LayerStats, LayerWriter, LocalSink, ParentRef, StreamSink,
                     make_images_dir, open_layer_for_write)

__all__ = ["Chain", "Layer", "PageRun", "list_layers", "open_chain", "LayerStats",
           "LayerWriter", "LocalSink", "ParentRef", "StreamSink", "make_images_dir",
           "open_layer_for_write", "key_id", "load_sign_key"]
