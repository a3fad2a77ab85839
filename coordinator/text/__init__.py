"""Text for language models (coordinator side): a tokenizer, corpora read from local packages, and
the token data sets agents train on (NPZ, :mod:`edge_agent.textdata`).

- :mod:`~coordinator.text.tokenizer`: byte-level tokenizer (vocabulary 256 bytes + specials);
- :mod:`~coordinator.text.austen`: Jane Austen's six novels from the Debian package r-cran-janeaustenr;
- :mod:`~coordinator.text.sequences`: fixed-length training sequences, splits per source, NPZ files.
"""
