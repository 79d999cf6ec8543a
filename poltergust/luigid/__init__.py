"""The central scheduler: luigid with the pipelines' one rule, the embedded one, and reading its graph."""
