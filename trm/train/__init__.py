"""Training: ``python -m trm.train CONFIG [key=value ...]`` (see ``trm.train.__main__``)."""

from trm.train.checkpoint import find_latest_checkpoint

__all__ = ["find_latest_checkpoint"]
