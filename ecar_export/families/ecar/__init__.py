"""The ECAR family: the model this repository defines, one module per part.

``config``    :class:`~ecar_export.families.ecar.config.ECARConfig`, every architectural and sampling choice
``schedule``  the multistage flow schedule and the per-sample noise (DESIGN §3, §4): the formulas
``contract``  its graph specs, request plan and stage constants, computed from the config (what a build writes)
``model``     the torch reference (:class:`~ecar_export.families.ecar.model.ECAR`: ``backbone``, ``flow_head``,
              ``layers``; the tokenizer is :mod:`ecar_export.tokenizer`, shared with FlowAR)
``family``    the :class:`~ecar_export.families.Family` entry the exporter, checker and calibration use

Kept light: importing the package imports none of them (the model's modules import the config from here).
"""
