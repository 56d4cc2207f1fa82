"""notice: causal mediation analysis of vision-language models (the NOTICE pipeline)."""

__version__ = "0.1.0"
