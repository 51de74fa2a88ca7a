"""A facility's training data: files and documents (:mod:`.corpus`), token streams and
sequences (:mod:`.tokens`), the training/validation split (:mod:`.dataset`), and a
pre-tokeniser for large corpora (``python -m xffl_tasks.data.pretokenize``)."""
