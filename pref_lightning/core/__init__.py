"""core: what every stage shares and nothing task-specific: user errors and the one-line CLI (`errors`, `cli`),
atomic file writes, the metric and its class conventions (`metrics`: log loss, prior, softmax, probability
floor), the training loss (`losses`), DDP helpers (`distributed`), process settings (`runtime`) and provenance
(`runinfo`). Imports nothing else of the package."""
