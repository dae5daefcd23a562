"""The benchmark harness and one module per benchmark; every figure is a ratio against a reference
measured in the same run."""
