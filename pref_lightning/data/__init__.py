"""data: from files to batches. Records (`records`, `adapters`, `sources`, `teacher`, `synthetic`), splits
(`folds`), per-side text statistics and their normalisation (`text_stats`, `stats_norm`), the encoding
contract the model receives (`contract.EncodingSpec`), tokenized pairs (`pairs`, `tokenizers`, `cache`),
batches (`collate`, `sampler`), the LightningDataModule (`datamodule`) and the submission file
(`submission`). Imports `core` only."""
