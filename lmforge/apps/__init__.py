"""Applications on real local text (``lmforge app``): task builders (translation from gettext catalogs,
summarization and question answering from Python sources), the keyed train/test split, the simple
baselines, and the recipe that fine-tunes and evaluates a model on each (:mod:`lmforge.apps.recipe`)."""
