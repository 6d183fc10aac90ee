"""A thin extension layer on torchtitan 0.2.2.

``import ext.job_config`` registers our config sections, train specs and
datasets with torchtitan; ``python -m ext.train`` (what ``run_train.sh``
runs) is torchtitan's trainer with those registered.
"""

__version__ = "0.1.0"
