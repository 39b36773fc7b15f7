"""Hugging Face integration (docs/design.md §10.3, docs/huggingface.md).

- `export.py`: `export_hf` / `import_hf`, the copier of the remote sources (`remote_sources`) and
  the `export-hf` / `import-hf` commands;
- `card.py`: the model card (README.md) of an exported folder;
- `tokenizer.py`: poegpt's BPE as a `tokenizer.json` of the `tokenizers` library, and back;
- `remote/`: `configuration_poegpt.py` and `modeling_poegpt.py`, the transformers wrapper that the
  export ships with the inference modules it imports.
"""
