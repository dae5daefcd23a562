"""Files and formats: built-in and file datasets, numbered run directories and atomic writers,
safetensors checkpoints. Depends on the core only."""
