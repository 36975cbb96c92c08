"""Jina Executors over the cliptuner core: CLIPTuner (/train), CLIPEncoder (/encode), CLIPIndexer (/index, /search).

This package is the ``py_modules`` entry of ``config.yml`` and ``flows/flow.yml``; the doc types are in
:mod:`executors.schemas`.
"""

from .encoder import CLIPEncoder
from .indexer import CLIPIndexer
from .schemas import ClipDoc, MatchDoc
from .shards import ShardMerger
from .tuner import CLIPTuner

__all__ = ["CLIPTuner", "CLIPEncoder", "CLIPIndexer", "ShardMerger", "ClipDoc", "MatchDoc"]
