"""Data pipelines, read in the direction the data flows:

- ``folder`` lists an image folder; ``convert`` writes it to a ``.beton`` for FFCV;
- ``spec`` is the reference multi-crop augmentation as data; ``loader`` is the loader contract (one constructor,
  the batch every backend yields, the shared epoch order and seeds); ``build`` makes the backend a config names;
- the backends: ``torch_loader`` (the reference on PIL, the baseline), ``dali``, and the package ``ffcv`` (its
  loader, its decode-once crop op, its photometric chain; see ``pipelines.ffcv``).

Importing this package imports nothing else, so ``dino_fast.config`` can read the crop defaults from ``spec``.
"""
