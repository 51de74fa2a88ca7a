"""The facility training task: ``python -m xffl_tasks.train``.

:mod:`.config` (the typed configuration, no torch), :mod:`.checkpoint` (model folders in and
out), :mod:`.schedule` (steps and learning rate, pure), :mod:`.distributed` (process group,
DDP, FSDP2), :mod:`.loop` (training and validation), :mod:`.recipe` (one run, start to end).
"""
