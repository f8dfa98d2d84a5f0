"""Other model families behind vidiffuse's pipeline surface: Wan 2.x, LTX-Video and CogVideoX via diffusers.

`VideoPipeline.from_pretrained(path_or_hub_id)` returns a `DiffusersVideoPipeline` when the directory is a
diffusers pipeline of one of `PIPELINES`; generate, eval, verify and the server then run it unchanged.
"""

from .diffusers_backend import (FAMILIES, PIPELINES, DiffusersVideoPipeline, diffusers_class, download,
                                generation_setup, load, looks_like_hub_id, weights_version)

__all__ = ["FAMILIES", "PIPELINES", "DiffusersVideoPipeline", "diffusers_class", "download", "generation_setup",
           "load", "looks_like_hub_id", "weights_version"]
