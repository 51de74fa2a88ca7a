"""The final evaluation at a facility: ``python -m xffl_tasks.evaluate`` (see ``__main__``).

:mod:`xffl_tasks.evaluate.result` (the evaluation.json schema and its bounded reader) and
:mod:`xffl_tasks.evaluate.config` need no torch; :mod:`xffl_tasks.evaluate.run` does.
"""
