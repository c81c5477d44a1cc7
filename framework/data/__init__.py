"""Data preparation (tokenizer, packed Parquet token shards, manifest) and per-worker streaming."""
