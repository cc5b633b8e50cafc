"""Bounds the runtime checks a build's or a request's numbers against (and every model family's config uses).

Generous for any image generator, small enough that an absurd value is refused before anything is
allocated or sent to an engine.
"""

CFG_LIMIT = 100.0  # |guidance weight| allowed: far beyond useful values, far below float32 overflow
MAX_CLASSES = 1_000_000  # labels of a class-conditional model
