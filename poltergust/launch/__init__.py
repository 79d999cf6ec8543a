"""Starting luigi processes: spawned afresh or forked from a warm interpreter, as the run's user."""
