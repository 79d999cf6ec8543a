"""One run of one config generation: who takes part, luigi's part, the claim, the result and the run's log."""
