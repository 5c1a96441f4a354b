"""dat-ds: Distributed Adversarial Training (Zhang et al., UAI 2022) on the DeepSpeed engine.

Data flows one way: shards -> loader -> attack -> loss -> engine backward -> compressed aggregation -> LALR step
-> metrics -> checkpoint. Each stage lives in the module of its name.
"""

__version__ = "0.1.0"
