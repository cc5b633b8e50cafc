"""Serving the runtime over HTTP (the ``serve`` extra: ``pip install 'ecar-export[serve]'``).

=============  ==================================================================
``requests``   what a served request is (parsing, validation, replies) and how concurrent
               requests share one engine batch: plain Python + numpy, tested without a cluster
``ray_app``    the Ray Serve deployment around it: replicas, request batching, the HTTP
               routes, starting and stopping a cluster (imports Ray)
=============  ==================================================================

``import runtime`` never imports this package; only ``ray_app`` imports Ray.
"""
