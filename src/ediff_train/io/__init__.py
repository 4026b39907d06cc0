"""Files and storage: atomic writes, the run lock, remote (fsspec) paths.

Depends on nothing else in the package."""
