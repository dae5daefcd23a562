"""Files and formats: built-in and file datasets (data.py), image folders and .npz image sets with
their embedding cache (images.py), numbered run directories and atomic writers (files.py), typed
configuration sections (config.py), safetensors checkpoints (checkpoint.py). Depends on the core only.
The names a researcher uses are listed in docs/api.md, section 2."""
