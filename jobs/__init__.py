"""Ray drivers: the attribution pipeline (``lnstd run``) and aggregation (``lnstd aggregate``)."""
