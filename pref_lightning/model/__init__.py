"""model: the network and its files. Backbones (`backbone`: DeBERTa, BERT-family, decoder LLMs), heads
(`head`), the statistics anchor (`anchor`), LoRA (`lora`, with export and fold averaging in `merge`), the
LightningModule (`module`), checkpoints (`checkpoint`), settings checked against backbone and machine
(`compat`) and starting from earlier stages (`stages`). Imports `core` and `data`."""
