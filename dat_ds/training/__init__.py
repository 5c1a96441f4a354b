"""Training, floor by floor: ``plan`` (everything derived from the recipe, checked before ranks start),
``state`` (what a rank holds), ``step`` (one micro-batch, and the batches of an epoch), ``resume`` (choosing and
restoring a checkpoint), ``phases`` (the run as a sequence of phases). The command is ``dat_ds.train``."""
