"""The on-storage format: dtypes, hashing, chunking, codecs, the state tree and manifests."""
