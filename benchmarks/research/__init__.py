"""Recipe research beside the benchmarks: the data sets the demo recipe was tuned and checked on, the recipe check
that runs it on them, the loss split, and the crop statistics of the augmentation (docs/small-data.md)."""
