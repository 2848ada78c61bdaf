"""speechformer: speech-to-text with transformers, written from their parts."""

__version__ = "0.1.0"
