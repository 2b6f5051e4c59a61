"""Calibration and evaluation text as token tensors.

A source is a registered hub name (``SOURCES``: wikitext2, c4, pile) or a local .txt/.jsonl file or
``datasets`` folder; ``sources`` reads documents, ``windows`` tokenizes them and cuts windows.
"""
from .sources import SOURCES, HubSource, source_label
from .windows import calibration_windows, evaluation_tokens, fitting_windows, perplexity_windows

__all__ = ["SOURCES", "HubSource", "calibration_windows", "evaluation_tokens", "fitting_windows", "perplexity_windows",
           "source_label"]
