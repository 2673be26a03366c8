"""Studies built on runs: the demo, paper presets, batches of runs, diagnostics, SuPar transfer."""
