"""The packaging stage: C -> a cffi extension in a self-contained package directory.

``targets`` decides which instruction-set variants a package holds; ``build``
compiles them, writes the manifest, keys the cache and publishes atomically.
"""
