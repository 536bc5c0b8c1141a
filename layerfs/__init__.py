"""layerfs: a layered, content-addressed image store with a FUSE union filesystem."""

__version__ = "0.1.0"
