"""Provenance for generated videos: an invisible watermark and a signed C2PA manifest.

Submodules are imported on demand (``vidiffuse.provenance.manifest``, ``.signing``, ``.watermark``) so that
using one does not load the native libraries of the others.
"""
