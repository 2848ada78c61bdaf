"""The transformer, written from its parts: attention, layers, the model, its config."""

from .attention import KVCache, MultiHeadAttention, RotaryEmbedding, attention, capture_attention, causal_mask
from .config import ModelConfig
from .layers import (ConformerLayer, ConvolutionModule, Conv1dGLUSubsampling, Conv1dSubsampling, Conv2dSubsampling, DecoderLayer, EncoderLayer, FeedForward,
                     LearnedPositions, SinusoidalPositions, sinusoids)
from .model import DecoderState, SpeechTransformer, TokenEmbedding

__all__ = [
    "KVCache", "MultiHeadAttention", "RotaryEmbedding", "ConformerLayer", "ConvolutionModule", "attention", "capture_attention", "causal_mask", "ModelConfig", "Conv1dGLUSubsampling", "Conv1dSubsampling",
    "Conv2dSubsampling", "DecoderLayer", "EncoderLayer", "FeedForward", "LearnedPositions",
    "SinusoidalPositions", "sinusoids", "DecoderState", "SpeechTransformer", "TokenEmbedding",
]
