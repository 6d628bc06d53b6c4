"""seqrec: sequential recommenders at cluster scale (Spark -> petastorm -> DeepSpeed)."""

__version__ = "0.1.0"
