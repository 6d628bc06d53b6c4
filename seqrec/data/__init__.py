"""Data: the shard contract (schema), the synthetic log, the petastorm loader."""
