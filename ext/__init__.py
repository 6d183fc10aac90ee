"""A thin extension layer on torchtitan 0.2.2.

Layers (docs/architecture.md), each importing only from those below it:
the entry modules directly in ``ext/`` (``job_config``, ``plugin``,
``cli``, ``train``, ...), then ``ext.training``, ``ext.model``, ``ext.data``
and ``ext.core``. ``import ext.job_config`` runs :func:`ext.plugin.install`
once (our config sections, train specs and the patches listed in
``ext.plugin.PATCHES``); ``python -m ext.train`` (what ``run_train.sh``
runs) is torchtitan's trainer with those installed.
"""

__version__ = "0.1.0"
