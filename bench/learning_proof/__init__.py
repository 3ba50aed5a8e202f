"""A from-scratch learning proof for long context: bench/learning_proof/README.md."""
