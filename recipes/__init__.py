"""The recipes: one launchable file per method (``accelerate launch recipes/dmd2.py``), installed with
the library as ``stepdistill.recipes``, and their tuned presets in ``configs/`` (``--config NAME``)."""
