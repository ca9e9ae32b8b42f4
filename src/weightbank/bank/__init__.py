"""The bank layer: save/load, refs, tags, log, diff, verify, gc and prune over a storage backend."""
