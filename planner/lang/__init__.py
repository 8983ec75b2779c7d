"""The language: what flow authors write (models, loader), its reference and `when:` languages
(refs, expr), what a statement does (sqlinfo), the compiled node (nodes) and the JSON Schema."""
