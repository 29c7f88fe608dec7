"""Reference model code vendored verbatim (see each file's header) for the parity tests."""
