"""Side-by-side performance suites for mtlxray (`mtlxray bench` or `python -m mtlxray.bench`)."""
