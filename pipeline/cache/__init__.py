"""Stage `extract` and the feature cache it writes: the target specification, the Zarr store
(the only module that knows the format), the extractor and the linear probe."""
