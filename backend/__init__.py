"""The qlw backend: the process that owns the GPU. Importing this package is cheap; the ML
stack (torch, transformers, ...) is imported only by the rooms that need it, when they run."""

__version__ = "0.1.0"
