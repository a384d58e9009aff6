"""What users run: the ``metasgd`` command and the use of a trained checkpoint.

- :mod:`.cli`: ``metasgd fit/validate/test`` (LightningCLI) and the dispatch to the other commands;
- :mod:`.inference`: load a checkpoint of any method, adapt it to a new task, get a plain ``nn.Module``;
- :mod:`.adapt_command`: ``metasgd adapt``; :mod:`.plotting`: ``metasgd plot-lrs``;
  :mod:`.task_plots`: ``metasgd plot-sine`` and ``plot-tasks``.
"""
