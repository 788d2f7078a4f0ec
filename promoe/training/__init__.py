"""The pieces of the training driver (`train/run.py`), one job per module:

- `ranks`: the few all-reduces by which the ranks agree (the process group is `promoe.distributed`'s);
- `parallel`: the model built on `meta`, activation checkpointing, `fully_shard`, materialised and initialised;
- `optimizer`: AdamW and the learning rate of a step;
- `batches`: the training data set and the sample indices of a step;
- `ema`: the exponential moving average of the weights;
- `folder`: the run folder: its lock, leftovers of killed writes, a fresh start in a folder that holds a run;
- `checkpoints`: atomic, digest-verified checkpoints, the newest intact one, pruning, and the EMA export (the
  folders' layout and reading: `promoe.checkpoint_format`);
- `resume`: what a resumed run may change and what it may not;
- `metrics`: the logged scalars and `metrics.csv`;
- `stop`: SIGTERM / SIGINT turned into a checkpoint at the end of the step, on every rank together;
- `end_of_run`: the plots, the class grid and the Fashion-MNIST FID that a finished run leaves beside its checkpoints.
"""
