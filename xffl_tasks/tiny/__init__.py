"""The tiny LLaMA model and the Italian and Czech corpora of the tests and the demo, made
offline and deterministically: ``python -m xffl_tasks.tiny --out DIR [--seed N]``."""

from xffl_tasks.tiny.maker import make_tiny
from xffl_tasks.tiny.model import TinyModelSpec

__all__ = ["TinyModelSpec", "make_tiny"]
