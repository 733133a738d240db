"""The small core every stage shares: errors, storage (fsspec, staging, atomic writes, locks),
the runtime (device, processes), the shard format between stages, views, attacks (the classifiers: pipeline/classifiers/)."""
