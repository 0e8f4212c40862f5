"""jaxdiff tests (a regular package, so `tests` never resolves to a site-packages one)."""
