"""Making generation cheaper: step caching, quantization and the speed/quality benchmark.

Each module transforms or wraps `pipe.transformer` without editing the pipeline, and undoes what it did
when its context ends, so variants can be compared side by side in one process.
"""
